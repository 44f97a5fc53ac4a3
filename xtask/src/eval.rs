//! `cargo xtask eval`: held-out exact-match accuracy of the task model through
//! our engine, per backend, optionally against HF transformers' accuracy on
//! the same prompts (tools/train_tiny/eval_hf.py writes that JSON).
//!
//! The protocol is eval_hf.py's: prompt = BOS + the prompt text (raw) or the
//! chat format; greedy decoding of at most len(answer tokens) + 1 tokens; a
//! hit is a generation that stops (end-of-text or end-of-turn) with exactly
//! the expected text before the stop token.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bitnet_inference::{generate, Backend, CpuBackend, CpuBackendConfig, GenerationConfig, ReferenceBackend};
use bitnet_models::tokenizer::{ChatMessage, ChatRole};
use bitnet_models::BitNetModel;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Raw,
    Chat,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[arg(long, default_value = "models/bitnet-tiny-tasks/bitnet-tiny-tasks.gguf")]
    model: PathBuf,
    /// JSON lines of {"task", "prompt", "answer"}.
    #[arg(long, default_value = "models/bitnet-tiny-tasks/heldout.jsonl")]
    data: PathBuf,
    /// Comma-separated backends: cpu, reference.
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    backends: Vec<String>,
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    /// eval_hf.py's JSON for the same model and data: report the difference
    /// and fail when overall accuracy differs by more than --max-diff-pp.
    #[arg(long)]
    hf_json: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    max_diff_pp: f64,
    /// Evaluate at most this many items per task (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Item {
    task: String,
    prompt: String,
    answer: String,
}

fn read_items(path: &PathBuf, limit: usize) -> anyhow::Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut per_task: BTreeMap<String, usize> = BTreeMap::new();
    let mut items = Vec::new();
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), line_no + 1))?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .with_context(|| format!("{}:{}: no string `{k}`", path.display(), line_no + 1))
        };
        let task = field("task")?;
        let count = per_task.entry(task.clone()).or_default();
        *count += 1;
        if limit > 0 && *count > limit {
            continue;
        }
        items.push(Item { task, prompt: field("prompt")?, answer: field("answer")? });
    }
    Ok(items)
}

/// Per task: (correct, total).
type Scores = BTreeMap<String, (usize, usize)>;

fn evaluate(backend: &mut dyn Backend, model: &BitNetModel, items: &[Item], format: Format) -> anyhow::Result<Scores> {
    let tok = &model.tokenizer;
    let stop: Vec<u32> = [tok.eos_id(), tok.eot_id()].into_iter().flatten().collect();
    let mut scores = Scores::new();
    for item in items {
        let (prompt, expected) = match format {
            Format::Raw => (tok.encode(&item.prompt, true)?, item.answer.clone()),
            Format::Chat => {
                let text = tok.chat_prompt(&[ChatMessage { role: ChatRole::User, content: item.prompt.clone() }])?;
                (tok.encode(&text, false)?, item.answer.trim_start_matches(' ').to_owned())
            }
        };
        let max_new = tok.encode(&expected, false)?.len() + 1;
        let config = GenerationConfig { stop_tokens: stop.clone(), ..GenerationConfig::greedy(max_new) };
        let out = generate(backend, &prompt, &config, |_| {})?;
        let stopped = out.tokens.last().is_some_and(|t| stop.contains(t));
        let text = tok.decode(&out.tokens[..out.tokens.len() - usize::from(stopped)], false)?;
        let entry = scores.entry(item.task.clone()).or_default();
        entry.0 += usize::from(stopped && text == expected);
        entry.1 += 1;
    }
    let (c, t) = scores.values().fold((0, 0), |(c, t), (a, b)| (c + a, t + b));
    scores.insert("all".into(), (c, t));
    Ok(scores)
}

/// HF accuracy per task from eval_hf.py's JSON, for the given format.
fn hf_scores(path: &PathBuf, format: Format) -> anyhow::Result<Scores> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let name = match format {
        Format::Raw => "raw",
        Format::Chat => "chat",
    };
    let result = v["results"]
        .as_array()
        .and_then(|r| r.iter().find(|x| x["format"] == name))
        .with_context(|| format!("{}: no results for format {name}", path.display()))?;
    let acc = result["accuracy"].as_object().context("no accuracy object")?;
    Ok(acc
        .iter()
        .filter_map(|(task, a)| Some((task.clone(), (a["correct"].as_u64()? as usize, a["total"].as_u64()? as usize))))
        .collect())
}

fn pct((c, t): (usize, usize)) -> f64 {
    if t == 0 {
        0.0
    } else {
        100.0 * c as f64 / t as f64
    }
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let (model, _) = BitNetModel::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let model = Arc::new(model);
    let items = read_items(&args.data, args.limit)?;
    let hf = args.hf_json.as_ref().map(|p| hf_scores(p, args.format)).transpose()?;
    let mut columns: Vec<(String, Scores)> = Vec::new();
    for name in &args.backends {
        let mut backend: Box<dyn Backend> = match name.as_str() {
            "cpu" => Box::new(CpuBackend::new(model.clone(), &CpuBackendConfig::default())?),
            "reference" => Box::new(ReferenceBackend::new(model.clone())),
            other => anyhow::bail!("unknown backend {other:?}; expected cpu or reference"),
        };
        let start = Instant::now();
        let scores = evaluate(backend.as_mut(), &model, &items, args.format)?;
        let info = backend.info();
        eprintln!("{name} ({}): {} items in {:.1} s", info.detail, items.len(), start.elapsed().as_secs_f64());
        columns.push((format!("{name} ({} {})", info.device, info.precision), scores));
    }
    if let Some(hf) = &hf {
        columns.push(("HF transformers (eval_hf.py)".into(), hf.clone()));
    }

    let mut table = String::new();
    let _ =
        writeln!(table, "model {} | data {} | format {:?}\n", args.model.display(), args.data.display(), args.format);
    let _ = write!(table, "| task |");
    for (name, _) in &columns {
        let _ = write!(table, " {name} |");
    }
    let _ = writeln!(table);
    let _ = writeln!(table, "|---|{}", "---:|".repeat(columns.len()));
    let tasks: Vec<String> = columns[0].1.keys().filter(|t| *t != "all").cloned().chain(["all".to_owned()]).collect();
    for task in &tasks {
        let _ = write!(table, "| {task} |");
        for (_, scores) in &columns {
            let s = scores.get(task).copied().unwrap_or((0, 0));
            let _ = write!(table, " {:.1}% ({}/{}) |", pct(s), s.0, s.1);
        }
        let _ = writeln!(table);
    }
    println!("{table}");

    let mut failures = Vec::new();
    if let Some(hf) = &hf {
        let hf_all = pct(hf.get("all").copied().unwrap_or((0, 0)));
        for (name, scores) in columns.iter().filter(|(n, _)| !n.starts_with("HF")) {
            anyhow::ensure!(
                scores.get("all").map(|s| s.1) == hf.get("all").map(|s| s.1),
                "{name}: evaluated {} items but the HF JSON has {}; use the same data and no --limit",
                scores["all"].1,
                hf.get("all").map_or(0, |s| s.1)
            );
            let diff = pct(scores["all"]) - hf_all;
            println!("{name}: overall {:+.2} percentage points against HF", diff);
            if diff.abs() > args.max_diff_pp {
                failures.push(format!("{name} differs from HF by {diff:+.2} pp (limit {} pp)", args.max_diff_pp));
            }
        }
    }
    if let Some(path) = &args.json {
        let report = json!({
            "model": args.model, "data": args.data, "format": format!("{:?}", args.format),
            "columns": columns.iter().map(|(n, s)| json!({"name": n, "scores": s.iter().map(|(t, (c, n))| (t.clone(), json!({"correct": c, "total": n}))).collect::<serde_json::Map<_, _>>()})).collect::<Vec<_>>(),
            "failures": failures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    anyhow::ensure!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}
