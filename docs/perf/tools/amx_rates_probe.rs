//! Session 36's probe of the AMX I2_S kernel's parts on the H200 host
//! (Sapphire Rapids-class Xeon VM). It uses the kernel's private items, so it
//! is not built: paste it into the `tests` module of
//! crates/bitnet-kernels/src/cpu/i2s/amx.rs, then on an AMX machine run
//! `cargo test --release -p bitnet-kernels --lib amx_rates -- --ignored --nocapture`
//! (or build with `--no-run` here and carry the binary). It prints G
//! multiply-adds/s of (a) `tdpbusd` alone on loaded tiles, (b) `block_product`
//! (2 x 2 tiles over k = 256, 2560, 6912), (d) whole tasks of 64 rows x 128
//! tokens on 1, 2, 8 and 16 threads at once, and (e) `unpack_rows`. Results:
//! docs/perf/cpu.md, "AMX: where a task's time goes (session 36)".

    /// Rates of the tile kernel's parts on this CPU (session 36 probe, run by hand).
    #[test]
    #[ignore]
    fn amx_rates() {
        use std::time::Instant;
        let Some(token) = AmxToken::detect() else {
            eprintln!("no AMX");
            return;
        };
        let macs_per_op = (16 * 16 * 64) as f64;
        let config = TileConfig::full();
        let a = vec![1u8; 4096];
        let b = vec![1i8; 4096];
        // (a) tdpbusd alone, tiles loaded once: 4 independent accumulators.
        let iters = 2_000_000usize;
        let t = Instant::now();
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            asm!("tileloadd tmm4, [{p} + {s}]", p = in(reg) a.as_ptr(), s = in(reg) 64usize, options(nostack, readonly));
            asm!("tileloadd tmm5, [{p} + {s}]", p = in(reg) a.as_ptr().add(1024), s = in(reg) 64usize, options(nostack, readonly));
            asm!("tileloadd tmm6, [{p} + {s}]", p = in(reg) b.as_ptr(), s = in(reg) 64usize, options(nostack, readonly));
            asm!("tileloadd tmm7, [{p} + {s}]", p = in(reg) b.as_ptr().add(1024), s = in(reg) 64usize, options(nostack, readonly));
            for _ in 0..iters {
                asm!("tdpbusd tmm0, tmm4, tmm6", "tdpbusd tmm1, tmm4, tmm7", "tdpbusd tmm2, tmm5, tmm6", "tdpbusd tmm3, tmm5, tmm7", options(nostack, nomem));
            }
            asm!("tilerelease", options(nostack, nomem));
        }
        let dt = t.elapsed().as_secs_f64();
        eprintln!("(a) tdpbusd only: {:.1} G MAC/s ({:.2} ns per tdpbusd)", 4.0 * iters as f64 * macs_per_op / dt / 1e9, dt * 1e9 / (4 * iters) as f64);
        // (b, c) block_product (2 x 2 tiles) over k from tiles in L1 (k = 256) and in L2 (k = 2560, 6912).
        for k in [256usize, 2560, 6912] {
            let unpacked = vec![1u8; 2 * TILE_ROWS * k];
            let tiles = vec![1i8; 2 * TILE_ROWS * k];
            let mut c = [[0i32; TILE_ROWS * TILE_ROWS]; 4];
            let reps = 400_000_000 / (k * 32 * 32);
            let t = Instant::now();
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
                for _ in 0..reps {
                    block_product::<2, 2>(&unpacked, &tiles, 0, k, &mut c);
                }
                asm!("tilerelease", options(nostack, nomem));
            }
            let dt = t.elapsed().as_secs_f64();
            eprintln!("(b) block_product 2x2 k={k}: {:.1} G MAC/s", (reps * 32 * 32 * k) as f64 / dt / 1e9);
        }
        // (d) whole tasks: 64 rows x 128 tokens (unpacking, products, transposes, stores).
        for k in [2560usize, 6912] {
            let n_tokens = 128;
            let rows = 64;
            let codes: Vec<u8> = (0..rows * k / 4).map(|i| (i * 37 % 256) as u8).collect();
            let q: Vec<i8> = (0..n_tokens * k).map(|i| (i * 13 % 200) as i8 - 100).collect();
            let tiles = tile_activations(&q, n_tokens, k);
            let acts = Activations { q: std::borrow::Cow::Borrowed(&q), sums: vec![0; n_tokens], k, tiles: Some(tiles) };
            let mut outs = vec![vec![0i32; rows]; n_tokens];
            let reps = 200_000_000_0 / (rows * n_tokens * k);
            let t = Instant::now();
            for _ in 0..reps {
                let mut out: Vec<&mut [i32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                gemm_tiled_tokens(token, &codes, &acts, &mut out, 0..n_tokens);
            }
            let dt = t.elapsed().as_secs_f64();
            eprintln!("(d) task 64 rows x 128 tokens k={k}: {:.1} G MAC/s one thread", (reps * rows * n_tokens * k) as f64 / dt / 1e9);
            // The same on every thread at once (each its own copy).
            for threads in [2usize, 8, 16] {
                let t = Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..threads {
                        scope.spawn(|| {
                            let mut outs = vec![vec![0i32; rows]; n_tokens];
                            for _ in 0..reps {
                                let mut out: Vec<&mut [i32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                                gemm_tiled_tokens(token, &codes, &acts, &mut out, 0..n_tokens);
                            }
                        });
                    }
                });
                let dt = t.elapsed().as_secs_f64();
                eprintln!("    {threads} threads: {:.1} G MAC/s per thread", (reps * rows * n_tokens * k) as f64 / dt / 1e9);
            }
        }
        // (e) unpacking alone, 32 rows of k = 2560.
        let k = 2560;
        let codes = vec![0x5au8; 32 * k / 4];
        let mut unpacked = vec![0u8; 32 * k];
        let reps = 100_000;
        let t = Instant::now();
        for _ in 0..reps {
            unsafe { unpack_rows(&codes, k / 4, 32, &mut unpacked) };
        }
        let dt = t.elapsed().as_secs_f64();
        eprintln!("(e) unpack 32 rows k=2560: {:.2} us each ({:.1} GB/s written)", dt * 1e6 / reps as f64, (reps * 32 * k) as f64 / dt / 1e9);
    }
