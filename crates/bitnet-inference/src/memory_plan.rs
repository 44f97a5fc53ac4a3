//! How much device memory a GPU backend needs for a model: the weights, the
//! KV cache of the sequences it holds, and a workspace sized for the largest
//! step. The CUDA backend allocates exactly these amounts, and the fallback
//! engine plans with the same numbers before sending work to the GPU, the
//! way TGI and vLLM size their KV pool from measured free memory at warm-up.
//!
//! ```
//! use bitnet_device::Precision;
//! use bitnet_inference::memory_plan::gpu_memory_plan;
//! use bitnet_models::BitNetConfig;
//!
//! let plan = gpu_memory_plan(&BitNetConfig::bitnet_2b4t(), Precision::Bf16, 4096, 2048);
//! assert!(plan.weights > 1_000_000_000); // 2B ternary weights plus a bf16 embedding
//! assert!(plan.total() > 500_000_000);   // so a 500 MB GPU cannot hold it
//! ```

use bitnet_device::Precision;
use bitnet_models::{BitNetConfig, BitNetModel};

/// Fixed workspace on top of the per-token buffers (cuBLAS handles, kernel
/// scratch, allocator slack).
pub const WORKSPACE_FIXED_BYTES: u64 = 64 << 20;

/// Device memory of one GPU backend, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuMemoryPlan {
    /// Packed ternary projections, the embedding (and head) in the
    /// activation precision, f32 norms.
    pub weights: u64,
    /// Keys and values of `kv_positions` positions, in the activation precision.
    pub kv_cache: u64,
    /// Activations and logits of a step of `max_batch_tokens` tokens, plus
    /// [`WORKSPACE_FIXED_BYTES`].
    pub workspace: u64,
}

impl GpuMemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.kv_cache).saturating_add(self.workspace)
    }
}

/// The plan for a model with a tied output head (the embedding is the head),
/// as microsoft/bitnet-b1.58-2B-4T.
pub fn gpu_memory_plan(
    config: &BitNetConfig,
    precision: Precision,
    kv_positions: usize,
    max_batch_tokens: usize,
) -> GpuMemoryPlan {
    let elem = precision.element_bytes();
    let (h, i, kv, v) =
        (config.hidden_size as u64, config.intermediate_size as u64, config.kv_dim() as u64, config.vocab_size as u64);
    // rows x cols of q, k, v, o, gate, up, down: 2 bits per weight plus one f32 scale.
    let projections = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)];
    let per_layer_projections: u64 = projections.iter().map(|&(rows, cols)| rows * cols / 4 + 4).sum();
    // attn_norm, attn_sub_norm, ffn_norm (hidden) and ffn_sub_norm (intermediate), f32.
    let per_layer_norms = (3 * h + i) * 4;
    let layers = config.n_layers as u64;
    let embedding = v * h * elem;
    let output_norm = h * 4;
    let weights = layers
        .saturating_mul(per_layer_projections + per_layer_norms)
        .saturating_add(embedding)
        .saturating_add(output_norm);

    let kv_cache = layers
        .saturating_mul(2 * config.n_kv_heads as u64 * config.head_dim as u64 * elem)
        .saturating_mul(kv_positions as u64);

    // Per token: four f32 hidden-sized buffers (residual, normed, attention
    // out, projection out), two intermediate-sized buffers in the precision
    // (gate, up), and f32 logits.
    let per_token = 4 * h * 4 + 2 * i * elem + v * 4;
    let workspace = (max_batch_tokens as u64).saturating_mul(per_token).saturating_add(WORKSPACE_FIXED_BYTES);
    GpuMemoryPlan { weights, kv_cache, workspace }
}

/// The plan for `model`: [`gpu_memory_plan`] plus the untied output head
/// when the model has one.
pub fn gpu_memory_plan_for_model(
    model: &BitNetModel,
    precision: Precision,
    kv_positions: usize,
    max_batch_tokens: usize,
) -> GpuMemoryPlan {
    let mut plan = gpu_memory_plan(&model.config, precision, kv_positions, max_batch_tokens);
    if model.output.is_some() {
        let head = model.config.vocab_size as u64 * model.config.hidden_size as u64 * precision.element_bytes();
        plan.weights = plan.weights.saturating_add(head);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_models::synthetic::{self, Preset};

    #[test]
    fn the_2b4t_plan_matches_the_shapes_counted_by_hand() {
        let config = BitNetConfig::bitnet_2b4t();
        let plan = gpu_memory_plan(&config, Precision::Bf16, 1, 0);
        // Per layer: q and o 2560x2560, k and v 640x2560, gate and up 6912x2560, down 2560x6912.
        let ternary_per_layer = (2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 6912 * 2560) / 4 + 7 * 4;
        let norms_per_layer = (3 * 2560 + 6912) * 4;
        let embedding = 128_256 * 2560 * 2;
        assert_eq!(plan.weights, 30 * (ternary_per_layer + norms_per_layer) + embedding + 2560 * 4);
        // One position: 30 layers x (K and V) x 5 heads x 128 x 2 bytes.
        assert_eq!(plan.kv_cache, 30 * 2 * 5 * 128 * 2);
        assert_eq!(plan.workspace, WORKSPACE_FIXED_BYTES);
        assert_eq!(plan.total(), plan.weights + plan.kv_cache + plan.workspace);
    }

    #[test]
    fn precision_changes_the_float_parts_only() {
        let config = BitNetConfig::bitnet_2b4t();
        let f32_plan = gpu_memory_plan(&config, Precision::Fp32, 100, 16);
        let f16_plan = gpu_memory_plan(&config, Precision::Fp16, 100, 16);
        assert_eq!(f16_plan, gpu_memory_plan(&config, Precision::Bf16, 100, 16));
        assert_eq!(f32_plan.weights - f16_plan.weights, 128_256 * 2560 * 2);
        assert_eq!(f32_plan.kv_cache, 2 * f16_plan.kv_cache);
        assert_eq!(f32_plan.workspace - f16_plan.workspace, 16 * 2 * 6912 * 2);
    }

    #[test]
    fn kv_and_workspace_grow_linearly() {
        let config = BitNetConfig::bitnet_2b4t();
        let one = gpu_memory_plan(&config, Precision::Fp16, 1, 1);
        let many = gpu_memory_plan(&config, Precision::Fp16, 4096, 2048);
        assert_eq!(many.kv_cache, 4096 * one.kv_cache);
        assert_eq!(many.workspace - WORKSPACE_FIXED_BYTES, 2048 * (one.workspace - WORKSPACE_FIXED_BYTES));
        assert_eq!(many.weights, one.weights);
    }

    #[test]
    fn an_untied_head_is_counted_once_more() {
        let mut model = synthetic::generate(Preset::Tiny, 1).unwrap();
        let tied = gpu_memory_plan_for_model(&model, Precision::Fp16, 8, 8);
        assert_eq!(tied, gpu_memory_plan(&model.config, Precision::Fp16, 8, 8));
        model.output = Some(model.embedding.clone());
        let untied = gpu_memory_plan_for_model(&model, Precision::Fp16, 8, 8);
        let (v, h) = (model.config.vocab_size as u64, model.config.hidden_size as u64);
        assert_eq!(untied.weights - tied.weights, v * h * 2);
    }
}
