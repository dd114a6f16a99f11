//! Merge and export: merged weights against the PEFT reference, merged-model logits against the
//! adapter-applied model, and every exported format read back by its reader (our loaders or
//! candle's GGUF reader). Tiny models use `../shared/reference/tiny/*`; real-model tests skip,
//! loudly, when SmolLM2 has not been fetched.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use common::*;
use peft_wit::export::combine::{commit_combined, parse_weighted_specs, CombineRequest};
use peft_wit::export::gguf::permute_rows;
use peft_wit::export::svd::{svd, truncate_product};
use peft_wit::export::*;
use peft_wit::lora::peft::load_peft;
use peft_wit::lora::LoraAdapter;
use peft_wit::model::config::{ModelConfig, PROJECTIONS};
use peft_wit::model::decoder::ForwardContext;
use peft_wit::model::load::{load_gguf, load_hf_dir, BaseDType, BaseModel};
use peft_wit::registry::{AdapterMeta, Registry};
use peft_wit::Error;

const ARCHS: [&str; 3] = ["llama", "qwen2", "mistral"];
const TINY_IDS: [u32; 12] = [1, 17, 250, 33, 99, 5, 301, 42, 42, 7, 180, 2];

fn tiny_dir(arch: &str) -> PathBuf {
    reference_dir().join("tiny").join(arch)
}

fn tiny(arch: &str) -> (BaseModel, LoraAdapter) {
    let model = load_hf_dir(&tiny_dir(arch), BaseDType::F32, &Device::Cpu).unwrap();
    let adapter = load_adapter(
        &tiny_dir(arch).join("lora_r4"),
        &model.decoder.config,
        &Device::Cpu,
    )
    .unwrap();
    (model, adapter)
}

fn logits(model: &BaseModel, adapter: Option<&LoraAdapter>, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let mut ctx = ForwardContext {
        adapter: adapter.map(|a| a as _),
        ..Default::default()
    };
    model
        .decoder
        .forward(&input, None, &mut ctx)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Every projection weight of `model`, dense f32, block by block.
fn projection_weights(model: &BaseModel) -> Vec<Vec<f32>> {
    model
        .decoder
        .blocks
        .iter()
        .flat_map(|b| b.projections.iter())
        .map(|p| flat(&p.weight.to_dense(DType::F32, &Device::Cpu).unwrap()))
        .collect()
}

/// The token ids `model`'s tokenizer gives `text` (no special tokens added).
fn token_ids(model: &BaseModel, text: &str) -> Vec<u32> {
    model
        .tokenizer()
        .unwrap()
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec()
}

/// `B·A·scale` of one pair, as a dense f32 tensor.
fn delta(adapter: &LoraAdapter, layer: usize, p: usize) -> Tensor {
    let pair = adapter.pair(layer, p).unwrap();
    (pair.b.as_tensor().matmul(pair.a.as_tensor()).unwrap() * pair.scale).unwrap()
}

/// The loader's un-permutation, restated here so the test checks the writer against it.
fn unpermute(t: &Tensor, heads: usize) -> Tensor {
    let dims = t.dims().to_vec();
    let mut shape = vec![heads, dims[0] / heads / 2, 2];
    shape.extend(&dims[1..]);
    t.reshape(shape)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

fn read_gguf(path: &Path) -> (gguf_file::Content, std::fs::File) {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    (content, file)
}

/// The metadata value under `key`; panics naming the key when it is missing.
fn md<'a>(c: &'a gguf_file::Content, key: &str) -> &'a gguf_file::Value {
    c.metadata
        .get(key)
        .unwrap_or_else(|| panic!("missing {key}"))
}

fn md_u32(c: &gguf_file::Content, key: &str) -> u32 {
    md(c, key).to_u32().unwrap()
}

fn md_str(c: &gguf_file::Content, key: &str) -> String {
    md(c, key).to_string().unwrap().clone()
}

#[test]
fn tiny_merged_logits_match_adapter_and_unmerge_is_exact() {
    for arch in ARCHS {
        let (mut model, adapter) = tiny(arch);
        let base = logits(&model, None, &TINY_IDS);
        let adapted = logits(&model, Some(&adapter), &TINY_IDS);
        let originals = projection_weights(&model);
        let unmerge = merge_into(&mut model.decoder, &adapter).unwrap();
        assert_eq!(unmerge.len(), 2 * PROJECTIONS.len());
        let merged = logits(&model, None, &TINY_IDS);
        let d = max_abs_diff(&merged, &adapted);
        let moved = max_abs_diff(&base, &adapted);
        eprintln!("{arch}: merged vs adapter-applied max |Δlogit| {d:.2e} (adapter moves logits by {moved:.2})");
        assert!(d < 1e-3, "{arch}: {d}");
        assert!(moved > 0.1, "{arch}: the adapter should change the logits");
        unmerge.restore(&mut model.decoder);
        let restored = projection_weights(&model);
        assert!(originals == restored, "{arch}: unmerge is not bit-exact");
        assert!(
            logits(&model, None, &TINY_IDS) == base,
            "{arch}: base logits after unmerge"
        );
    }
}

#[test]
fn tiny_hf_dir_round_trip_single_and_sharded() {
    for arch in ARCHS {
        let (mut model, adapter) = tiny(arch);
        let adapted = logits(&model, Some(&adapter), &TINY_IDS);
        let tmp = tempfile::tempdir().unwrap();
        let single = tmp.path().join("single");
        let sharded = tmp.path().join("sharded");
        let opts = HfExportOptions {
            dtype: DType::F32,
            ..Default::default()
        };
        write_hf_dir(&model, Some(&adapter), &single, &opts).unwrap();
        assert!(single.join("model.safetensors").is_file());
        let small = HfExportOptions {
            dtype: DType::F32,
            max_shard_size: parse_size("100KB").unwrap(),
            force: false,
        };
        write_hf_dir(&model, Some(&adapter), &sharded, &small).unwrap();
        let index = read_json(sharded.join("model.safetensors.index.json"));
        let shards: std::collections::BTreeSet<&str> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            shards.len() > 2,
            "{arch}: expected several shards, got {shards:?}"
        );
        assert!(!sharded.join("model.safetensors").exists());
        let config = read_json(single.join("config.json"));
        assert_eq!(config["model_type"], arch);
        assert_eq!(
            config["tie_word_embeddings"],
            model.decoder.config.tie_word_embeddings
        );
        assert_eq!(
            config["rope_scaling"].is_null(),
            arch != "llama",
            "{arch}: rope_scaling"
        );
        let weights = safetensors_names(&single);
        assert_eq!(
            weights.contains("lm_head.weight"),
            !model.decoder.config.tie_word_embeddings
        );
        assert!(weights.contains("model.layers.1.self_attn.q_proj.weight"));
        for dir in [&single, &sharded] {
            let reloaded = load_hf_dir(dir, BaseDType::F32, &Device::Cpu).unwrap();
            assert_eq!(
                reloaded.decoder.config, model.decoder.config,
                "{arch}: config round trip"
            );
            let d = max_abs_diff(&logits(&reloaded, None, &TINY_IDS), &adapted);
            eprintln!(
                "{arch}: merged HF dir ({}) vs adapter-applied max |Δlogit| {d:.2e}",
                dir.file_name().unwrap().to_string_lossy()
            );
            assert!(d < 1e-3, "{arch}: {d}");
        }
        // Existing output: refused without --force, replaced with it.
        assert!(write_hf_dir(&model, None, &single, &opts).is_err());
        let _ = merge_into(&mut model.decoder, &adapter).unwrap();
        let bf16 = HfExportOptions {
            dtype: DType::BF16,
            force: true,
            ..Default::default()
        };
        write_hf_dir(&model, None, &single, &bf16).unwrap();
        assert_eq!(
            read_json(single.join("config.json"))["torch_dtype"],
            "bfloat16"
        );
    }
}

fn safetensors_names(dir: &Path) -> std::collections::HashSet<String> {
    let t = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    t.into_keys().collect()
}

#[test]
fn tiny_merged_gguf_has_llama_cpp_layout() {
    for arch in ["qwen2", "mistral"] {
        let (model, adapter) = tiny(arch);
        let c = model.decoder.config.clone();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.gguf");
        write_merged_gguf(&model, Some(&adapter), &path, GgufQuant::F32, false).unwrap();
        let (content, mut file) = read_gguf(&path);
        let gguf_arch = if arch == "qwen2" { "qwen2" } else { "llama" };
        assert_eq!(md_str(&content, "general.architecture"), gguf_arch);
        assert_eq!(
            md_u32(&content, &format!("{gguf_arch}.block_count")) as usize,
            c.num_hidden_layers
        );
        assert_eq!(
            md_u32(&content, &format!("{gguf_arch}.attention.head_count_kv")) as usize,
            c.num_key_value_heads
        );
        assert_eq!(
            md_u32(&content, &format!("{gguf_arch}.rope.dimension_count")) as usize,
            c.head_dim
        );
        let re = ModelConfig::from_gguf(&content).unwrap();
        assert_eq!(
            (
                re.hidden_size,
                re.intermediate_size,
                re.rope_theta,
                re.qkv_bias,
                re.tie_word_embeddings
            ),
            (
                c.hidden_size,
                c.intermediate_size,
                c.rope_theta,
                c.qkv_bias,
                c.tie_word_embeddings
            )
        );
        assert_eq!(
            content.tensor_infos.contains_key("output.weight"),
            !c.tie_word_embeddings
        );
        assert_eq!(
            content.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype,
            candle_core::quantized::GgmlDType::F32
        );
        for (p, gguf, heads) in [
            (0, "attn_q", c.num_attention_heads),
            (1, "attn_k", c.num_key_value_heads),
            (6, "ffn_down", 0),
        ] {
            let q = content
                .tensor(&mut file, &format!("blk.1.{gguf}.weight"), &Device::Cpu)
                .unwrap();
            let stored = q.dequantize(&Device::Cpu).unwrap();
            let hf = if arch == "mistral" && heads > 0 {
                unpermute(&stored, heads)
            } else {
                stored
            };
            let w = &model.decoder.blocks[1].projections[p].weight;
            let expected =
                (w.to_dense(DType::F32, &Device::Cpu).unwrap() + delta(&adapter, 1, p)).unwrap();
            let d = max_abs_diff(&flat(&hf), &flat(&expected));
            assert!(d < 1e-6, "{arch} {gguf}: {d}");
        }
        if c.qkv_bias {
            let q = content
                .tensor(&mut file, "blk.0.attn_q.bias", &Device::Cpu)
                .unwrap();
            let b = model.decoder.blocks[0].projections[0]
                .bias
                .as_ref()
                .unwrap();
            assert_eq!(flat(&q.dequantize(&Device::Cpu).unwrap()), flat(b));
        }
    }
    // Quantized types need whole blocks per row; others fall back to F16, norms stay F32.
    let (model, adapter) = tiny("mistral");
    let tmp = tempfile::tempdir().unwrap();
    use candle_core::quantized::GgmlDType as G;
    for (quant, q_dtype, down_dtype) in [
        (GgufQuant::Q4_0, G::Q4_0, G::Q4_0),
        (GgufQuant::Q4K, G::F16, G::F16),
        (GgufQuant::Q8_0, G::Q8_0, G::Q8_0),
    ] {
        let path = tmp.path().join(format!("{quant:?}.gguf"));
        write_merged_gguf(&model, Some(&adapter), &path, quant, false).unwrap();
        let (content, _) = read_gguf(&path);
        assert_eq!(
            content.tensor_infos["blk.0.attn_q.weight"].ggml_dtype, q_dtype,
            "{quant:?}"
        );
        assert_eq!(
            content.tensor_infos["blk.1.ffn_down.weight"].ggml_dtype, down_dtype,
            "{quant:?}"
        );
        assert_eq!(
            content.tensor_infos["output_norm.weight"].ggml_dtype,
            G::F32,
            "{quant:?}"
        );
    }
    // llama3 rope scaling would need llama.cpp's rope_freqs tensor, which our reader ignores.
    let (model, adapter) = tiny("llama");
    let tmp = tempfile::tempdir().unwrap();
    let err = write_merged_gguf(
        &model,
        Some(&adapter),
        &tmp.path().join("x.gguf"),
        GgufQuant::F16,
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("rope scaling"), "{err}");
    assert!(!tmp.path().join("x.gguf").exists());
}

#[test]
fn permute_is_the_inverse_of_the_loader_unpermute() {
    let t = Tensor::arange(0f32, 8.0 * 16.0 * 3.0, &Device::Cpu)
        .unwrap()
        .reshape((8 * 16, 3))
        .unwrap();
    for heads in [1, 2, 4, 8] {
        let back = unpermute(&permute_rows(&t, heads).unwrap(), heads);
        assert_eq!(flat(&back), flat(&t));
    }
    assert!(permute_rows(&t, 3).is_err());
}

#[test]
fn tiny_gguf_lora_has_llama_cpp_keys_shapes_and_permutation() {
    let (model, adapter) = tiny("llama");
    let c = &model.decoder.config;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("lora.gguf");
    write_gguf_lora(&adapter, c, &path, false, false).unwrap();
    let (content, mut file) = read_gguf(&path);
    assert_eq!(md_str(&content, "general.type"), "adapter");
    assert_eq!(md_str(&content, "adapter.type"), "lora");
    assert_eq!(md_str(&content, "general.architecture"), "llama");
    assert_eq!(
        content.metadata["adapter.lora.alpha"].to_f32().unwrap(),
        8.0
    );
    assert_eq!(content.tensor_infos.len(), 2 * 2 * PROJECTIONS.len());
    // llama.cpp's name for each HF projection, in `PROJECTIONS` order.
    let names = [
        ("q_proj", "attn_q"),
        ("k_proj", "attn_k"),
        ("v_proj", "attn_v"),
        ("o_proj", "attn_output"),
        ("gate_proj", "ffn_gate"),
        ("up_proj", "ffn_up"),
        ("down_proj", "ffn_down"),
    ];
    assert_eq!(names.map(|(hf, _)| hf), PROJECTIONS);
    for layer in 0..2 {
        for (p, (_, gguf)) in names.iter().enumerate() {
            let pair = adapter.pair(layer, p).unwrap();
            let a = content
                .tensor(
                    &mut file,
                    &format!("blk.{layer}.{gguf}.weight.lora_a"),
                    &Device::Cpu,
                )
                .unwrap();
            let b = content
                .tensor(
                    &mut file,
                    &format!("blk.{layer}.{gguf}.weight.lora_b"),
                    &Device::Cpu,
                )
                .unwrap();
            // candle lists dims outermost first: [r, in] here is ne = [in, r] in the file.
            assert_eq!(a.shape().dims(), pair.a.as_tensor().dims());
            assert_eq!(b.shape().dims(), pair.b.as_tensor().dims());
            let a = a.dequantize(&Device::Cpu).unwrap();
            let mut b = b.dequantize(&Device::Cpu).unwrap();
            match p {
                0 => b = unpermute(&b, c.num_attention_heads),
                1 => b = unpermute(&b, c.num_key_value_heads),
                _ => {}
            }
            assert_eq!(flat(&a), flat(pair.a.as_tensor()), "{gguf} A");
            assert_eq!(flat(&b), flat(pair.b.as_tensor()), "{gguf} B");
        }
    }
    // The q rows of B really are moved (r=4 sines are not symmetric under the permutation).
    let raw_b = content
        .tensor(&mut file, "blk.0.attn_q.weight.lora_b", &Device::Cpu)
        .unwrap();
    assert_ne!(
        flat(&raw_b.dequantize(&Device::Cpu).unwrap()),
        flat(adapter.pair(0, 0).unwrap().b.as_tensor())
    );
    // rsLoRA: llama.cpp computes alpha / r, so alpha is stored as alpha·sqrt(r).
    let mut rs = adapter.detached_copy().unwrap();
    rs.config.use_rslora = true;
    let rs_path = tmp.path().join("rs.gguf");
    write_gguf_lora(&rs, c, &rs_path, true, false).unwrap();
    let (content, _) = read_gguf(&rs_path);
    assert_eq!(
        content.metadata["adapter.lora.alpha"].to_f32().unwrap(),
        16.0
    );
    assert_eq!(
        content.tensor_infos["blk.0.attn_q.weight.lora_a"].ggml_dtype,
        candle_core::quantized::GgmlDType::F16
    );
}

#[test]
fn peft_export_round_trips_tensors_and_logits() {
    let (model, adapter) = tiny("qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("peft");
    export_peft_dir(
        &tiny_dir("qwen2").join("lora_r4"),
        &model.decoder.config,
        &out,
        false,
    )
    .unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors"
        ]
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("base_model: tiny-random-qwen2"), "{card}");
    let back = load_peft(&out, &model.decoder.config, DType::F32, &Device::Cpu).unwrap();
    let (a, b) = (adapter.named_vars(), back.named_vars());
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(flat(va.as_tensor()), flat(vb.as_tensor()), "{ka}");
    }
    assert!(logits(&model, Some(&adapter), &TINY_IDS) == logits(&model, Some(&back), &TINY_IDS));
}

#[test]
fn model_card_names_loss_weights_and_data_fingerprint() {
    let (_, adapter) = tiny("llama");
    let meta: AdapterMeta = serde_json::from_value(serde_json::json!({
        "format_version": 1, "name": "wit", "base": {"name": "tiny", "fingerprint": "abc", "architecture": "llama",
        "base_dtype": "f32", "num_layers": 2, "hidden_size": 64},
        "loss": {"prompt_weight": 0.2, "response_weight": 0.8, "system_weight": null, "user_weight": null, "normalization": "token-count"},
        "data": {"fingerprint": "d474", "source": "builtin:capitals", "template": "chatml", "train_examples": 10, "eval_examples": 2},
        "lora": adapter.config, "train_config": null, "seed": 1, "metrics": {}, "steps": 5, "tokens_seen": 100,
        "wall_time_s": 1.0, "created_unix": 0
    })).unwrap();
    let card = peft_dir::model_card("tiny", &adapter.config, Some(&meta));
    for needle in [
        "base_model: tiny",
        "prompt = 0.2",
        "response = 0.8",
        "d474",
        "builtin:capitals",
    ] {
        assert!(card.contains(needle), "{needle} not in {card}");
    }
}

fn dense_delta(adapter: &LoraAdapter, layer: usize, p: usize) -> Vec<f32> {
    flat(&delta(adapter, layer, p))
}

#[test]
fn combined_adapters_cat_svd_linear() {
    let (model, a1) = tiny("llama");
    // A second, different adapter: B negated and doubled.
    let a2 = a1.detached_copy().unwrap();
    for (_, var) in a2.named_vars().iter().filter(|(k, _)| k.contains("lora_B")) {
        var.set(&(var.as_tensor() * -2.0).unwrap()).unwrap();
    }
    let (w1, w2) = (0.7, 0.4);
    let inputs = [
        WeightedAdapter {
            adapter: &a1,
            weight: w1,
        },
        WeightedAdapter {
            adapter: &a2,
            weight: w2,
        },
    ];
    let expected = |l: usize, p: usize| -> Vec<f32> {
        let d1 = dense_delta(&a1, l, p);
        let d2 = dense_delta(&a2, l, p);
        d1.iter()
            .zip(&d2)
            .map(|(x, y)| w1 as f32 * x + w2 as f32 * y)
            .collect()
    };
    let cat = combine_adapters(&inputs, CombineMethod::Cat, None).unwrap();
    assert_eq!(cat.config.r, 8);
    let svd8 = combine_adapters(&inputs, CombineMethod::Svd, Some(8)).unwrap();
    let mut worst = (0f32, 0f32);
    for l in 0..2 {
        for p in 0..PROJECTIONS.len() {
            let e = expected(l, p);
            worst.0 = worst.0.max(max_abs_diff(&dense_delta(&cat, l, p), &e));
            worst.1 = worst.1.max(max_abs_diff(&dense_delta(&svd8, l, p), &e));
        }
    }
    eprintln!(
        "cat max |ΔW error| {:.2e}, svd(r=8) {:.2e}",
        worst.0, worst.1
    );
    assert!(worst.0 < 1e-6 && worst.1 < 1e-5, "{worst:?}");
    // a2 = -2·a1 in B, so the exact sum has rank 4: svd to r=4 is still exact.
    let svd4 = combine_adapters(&inputs, CombineMethod::Svd, Some(4)).unwrap();
    let d = max_abs_diff(&dense_delta(&svd4, 1, 6), &expected(1, 6));
    assert!(d < 1e-5, "svd r=4: {d}");
    // linear is exact for one adapter combined with itself: (√.5+√.5)²·½ ... = w·ΔW with w = 1.
    let half = [
        WeightedAdapter {
            adapter: &a1,
            weight: 0.25,
        },
        WeightedAdapter {
            adapter: &a1,
            weight: 0.25,
        },
    ];
    let lin = combine_adapters(&half, CombineMethod::Linear, None).unwrap();
    let d = max_abs_diff(&dense_delta(&lin, 0, 0), &dense_delta(&a1, 0, 0));
    assert!(d < 1e-6, "linear: {d}");
    assert!(combine_adapters(
        &[
            inputs[0].clone(),
            WeightedAdapter {
                adapter: &cat,
                weight: 1.0
            }
        ],
        CombineMethod::Linear,
        None
    )
    .is_err());

    // Into a registry, and back.
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::open(tmp.path()).unwrap();
    let sources = vec![("a".to_string(), w1, None), ("b".to_string(), w2, None)];
    let request = CombineRequest {
        name: "mix",
        adapter: &cat,
        model: &model.decoder.config,
        base_name: "tiny",
        sources: &sources,
        method: CombineMethod::Cat,
        force: false,
    };
    let dir = commit_combined(&registry, &request).unwrap();
    let back = load_adapter(&dir, &model.decoder.config, &Device::Cpu).unwrap();
    assert_eq!(flat(&delta(&back, 0, 3)), flat(&delta(&cat, 0, 3)));
    let meta = AdapterMeta::read(&dir).unwrap();
    assert!(
        meta.data.source.contains("cat") && meta.data.source.contains("a:0.7"),
        "{}",
        meta.data.source
    );
    assert!(commit_combined(&registry, &request).is_err());
    assert_eq!(
        parse_weighted_specs("a:0.5, dir/x:1:-1,b").unwrap(),
        vec![
            ("a".into(), 0.5),
            ("dir/x:1".into(), -1.0),
            ("b".into(), 1.0)
        ]
    );
}

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
}

#[test]
fn jacobi_svd_reconstructs_and_is_orthonormal() {
    let mut seed = 7;
    for (rows, cols) in [(60, 25), (25, 60), (1, 5), (30, 30)] {
        let m: Vec<f64> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
        let s = svd(&m, rows, cols);
        let k = rows.min(cols);
        assert_eq!(s.s.len(), k);
        assert!(s.s.windows(2).all(|w| w[0] >= w[1]), "descending");
        let mut worst = 0f64;
        for r in 0..rows {
            for c in 0..cols {
                let x: f64 = (0..k).map(|t| s.u[t][r] * s.s[t] * s.v[t][c]).sum();
                worst = worst.max((x - m[r * cols + c]).abs());
            }
        }
        for i in 0..k {
            for j in 0..k {
                let uu: f64 = (0..rows).map(|t| s.u[i][t] * s.u[j][t]).sum();
                let vv: f64 = (0..cols).map(|t| s.v[i][t] * s.v[j][t]).sum();
                let e = if i == j { 1.0 } else { 0.0 };
                worst = worst.max((uu - e).abs()).max((vv - e).abs());
            }
        }
        assert!(worst < 1e-10, "{rows}x{cols}: {worst}");
    }
    // Known singular values: diag(3, 2, 1) embedded in a 4x3 matrix.
    let m = [0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0];
    let s = svd(&m, 4, 3);
    assert!(
        (s.s[0] - 3.0).abs() < 1e-12
            && (s.s[1] - 2.0).abs() < 1e-12
            && (s.s[2] - 1.0).abs() < 1e-12
    );
}

#[test]
fn truncated_product_svd_on_a_full_size_projection() {
    // The largest SmolLM2 shape (1536 x 576) with rank 8: the rank-8 factors are exact, the
    // rank-4 ones leave exactly the tail singular values as Frobenius error.
    let (out, inp, k) = (1536, 576, 8);
    let mut seed = 3;
    let b: Vec<f64> = (0..out * k).map(|_| lcg(&mut seed)).collect();
    let a: Vec<f64> = (0..k * inp).map(|_| lcg(&mut seed)).collect();
    let full = |bb: &[f64], aa: &[f64], r: usize| -> Vec<f64> {
        let mut m = vec![0.0; out * inp];
        for i in 0..out {
            for t in 0..r {
                let x = bb[i * r + t];
                for j in 0..inp {
                    m[i * inp + j] += x * aa[t * inp + j];
                }
            }
        }
        m
    };
    let exact = full(&b, &a, k);
    let norm: f64 = exact.iter().map(|x| x * x).sum::<f64>().sqrt();
    // The Frobenius error of the rank-`r` truncation, and the singular values it reports.
    let truncate = |r: usize| -> (f64, Vec<f64>) {
        let (br, ar, s) = truncate_product(&b, &a, out, k, inp, r);
        let err = full(&br, &ar, r)
            .iter()
            .zip(&exact)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        (err, s)
    };
    let (err8, s) = truncate(8);
    assert!(err8 / norm < 1e-12, "rank 8: {err8}");
    let (err4, _) = truncate(4);
    let tail: f64 = s[4..].iter().map(|x| x * x).sum::<f64>().sqrt();
    eprintln!("rank-4 truncation error {err4:.6}, tail singular values {tail:.6}");
    assert!((err4 - tail).abs() / tail < 1e-9);
}

// ---- bad inputs -------------------------------------------------------------------------

#[test]
fn adapter_for_another_base_is_refused() {
    let (model, adapter) = tiny("llama");
    let mut other = model.decoder.config.clone();
    other.hidden_size = 128;
    let err = load_adapter(&tiny_dir("llama").join("lora_r4"), &other, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::AdapterMismatch { .. }), "{err}");
    assert!(err.to_string().contains("another base"), "{err}");
    // An adapter with fewer layers than the decoder cannot be merged either.
    let mut fewer = model.decoder.config.clone();
    fewer.num_hidden_layers = 1;
    let tmp = tempfile::tempdir().unwrap();
    let small = LoraAdapter::init(&adapter.config, &fewer, 0, DType::F32, &Device::Cpu).unwrap();
    let mut model = model;
    let err = merge_into(&mut model.decoder, &small).unwrap_err();
    assert!(matches!(err, Error::AdapterMismatch { .. }), "{err}");
    assert!(write_hf_dir(
        &model,
        Some(&small),
        &tmp.path().join("o"),
        &HfExportOptions::default()
    )
    .is_err());
    assert!(!tmp.path().join("o").exists());
}

#[test]
fn non_finite_merged_weights_are_refused() {
    let (mut model, adapter) = tiny("mistral");
    let bad = adapter.detached_copy().unwrap();
    let b = bad.pair(1, 5).unwrap().b.clone();
    let mut values = flat(b.as_tensor());
    values[3] = f32::NAN;
    b.set(&Tensor::from_vec(values, b.as_tensor().shape(), &Device::Cpu).unwrap())
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let err = write_hf_dir(&model, Some(&bad), &out, &HfExportOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::NonFiniteWeight { name } if name == "model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
    assert!(!out.exists(), "no partial output");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "staging dir cleaned up"
    );
    let err = write_merged_gguf(
        &model,
        Some(&bad),
        &tmp.path().join("m.gguf"),
        GgufQuant::Q8_0,
        false,
    )
    .unwrap_err();
    assert!(matches!(err, Error::NonFiniteWeight { .. }), "{err}");
    let before = logits(&model, None, &TINY_IDS);
    assert!(merge_into(&mut model.decoder, &bad).is_err());
    assert!(
        logits(&model, None, &TINY_IDS) == before,
        "a failed merge leaves the model untouched"
    );
}

#[test]
fn unknown_target_module_is_refused() {
    let (model, _) = tiny("llama");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lora");
    std::fs::create_dir(&dir).unwrap();
    let src = tiny_dir("llama").join("lora_r4");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config = read_json(src.join("adapter_config.json"));
    config["target_modules"]
        .as_array_mut()
        .unwrap()
        .push("lm_head".into());
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let err = load_adapter(&dir, &model.decoder.config, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::UnsupportedAdapter { .. }), "{err}");
    assert!(err.to_string().contains("lm_head"), "{err}");
    let err =
        export_peft_dir(&dir, &model.decoder.config, &tmp.path().join("out"), false).unwrap_err();
    assert!(err.to_string().contains("lm_head"), "{err}");
}

#[test]
fn bad_flags_are_refused() {
    assert!(parse_size("2GB").unwrap() == 2_000_000_000 && parse_size("1GiB").unwrap() == 1 << 30);
    for bad in ["", "GB", "-1GB", "2XB"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    assert!("q5_9".parse::<GgufQuant>().is_err());
    assert!("ties".parse::<CombineMethod>().is_err());
    assert!(parse_weighted_specs(" , ").is_err());
}

#[test]
fn cli_export_and_merge_adapters_run() {
    let exe = env!("CARGO_BIN_EXE_peft-wit");
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_dir("qwen2");
    let lora = model.join("lora_r4");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(exe)
            .args(args)
            .env("PEFT_WIT_REGISTRY", tmp.path().join("reg"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let m = model.to_str().unwrap();
    let l = lora.to_str().unwrap();
    let p = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    run(&[
        "export",
        "--adapter",
        l,
        "--format",
        "peft",
        "--out",
        &p("peft"),
        "--model",
        m,
    ]);
    run(&[
        "export",
        "--adapter",
        l,
        "--format",
        "gguf-lora",
        "--out",
        &p("lora.gguf"),
        "--model",
        m,
    ]);
    run(&[
        "merge-adapters",
        &format!("{l}:0.5,{}:0.5", p("peft")),
        "--method",
        "svd",
        "--rank",
        "2",
        "--out",
        "mix",
        "--model",
        m,
    ]);
    run(&[
        "merge",
        "--adapter",
        "mix",
        "--out",
        &p("merged"),
        "--model",
        m,
        "--dtype",
        "f32",
    ]);
    run(&[
        "merge",
        "--adapter",
        "mix",
        "--out",
        &p("merged.gguf"),
        "--model",
        m,
        "--quant",
        "q8_0",
    ]);
    assert!(tmp.path().join("reg/mix/peft_wit.json").is_file());
    assert!(tmp.path().join("merged/model.safetensors").is_file());
    assert!(tmp.path().join("merged.gguf").is_file());
    let out = std::process::Command::new(exe)
        .args(["merge", "--adapter", l, "--out", &p("merged"), "--model", m])
        .output()
        .unwrap();
    assert!(!out.status.success(), "existing output without --force");
}

// ---- the real model -----------------------------------------------------------------------

fn smollm(base_dtype: BaseDType) -> Option<(BaseModel, LoraAdapter)> {
    let path = real_model()?;
    let model = load_gguf(&path, base_dtype, &Device::Cpu).expect("load GGUF");
    let dir = reference_dir()
        .join("smollm2-135m-instruct")
        .join("lora_r4");
    let adapter = load_adapter(&dir, &model.decoder.config, &Device::Cpu).unwrap();
    Some((model, adapter))
}

const SMOLLM_IDS: [u32; 10] = [1, 9690, 198, 2683, 314, 253, 5356, 30, 2, 198];

#[test]
fn smollm2_merged_weights_match_peft_reference() {
    let Some((model, adapter)) = smollm(BaseDType::F32) else {
        return;
    };
    let reference = read_json(
        reference_dir()
            .join("smollm2-135m-instruct")
            .join("merged.json"),
    );
    for (key, layer, p) in [
        ("layers.0.self_attn.q_proj", 0, 0),
        ("layers.29.mlp.down_proj", 29, 6),
    ] {
        let r = &reference[key];
        let w = merged_weight(
            &model.decoder.blocks[layer].projections[p].weight,
            adapter.pair(layer, p),
            key,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(w.dims(), usizes(&r["shape"]).as_slice());
        let v = flat(&w);
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let abs: f64 = v.iter().map(|&x| x.abs() as f64).sum();
        let d4 = max_abs_diff(&v[..4], &f32s(&r["first4"]));
        eprintln!(
            "{key}: sum {sum:.5} vs {}, abs_sum {abs:.4} vs {}, first4 max |Δ| {d4:.1e}",
            r["sum"], r["abs_sum"]
        );
        assert!(
            rel_err(sum, r["sum"].as_f64().unwrap()) < 1e-3,
            "{key} sum {sum}"
        );
        assert!(
            rel_err(abs, r["abs_sum"].as_f64().unwrap()) < 1e-3,
            "{key} abs_sum {abs}"
        );
        assert!(d4 < 1e-5, "{key} first4 {d4}");
    }
}

#[test]
fn smollm2_merged_model_and_exports_give_the_same_logits() {
    for base_dtype in [BaseDType::Quantized, BaseDType::F32] {
        let Some((mut model, adapter)) = smollm(base_dtype) else {
            return;
        };
        let adapted = logits(&model, Some(&adapter), &SMOLLM_IDS);
        let unmerge = merge_into(&mut model.decoder, &adapter).unwrap();
        let merged = logits(&model, None, &SMOLLM_IDS);
        let d = max_abs_diff(&merged, &adapted);
        eprintln!(
            "SmolLM2 ({}): merged vs adapter-applied max |Δlogit| {d:.2e}",
            base_dtype.name()
        );
        assert!(d < 1e-3, "{d}");
        if base_dtype == BaseDType::Quantized {
            unmerge.restore(&mut model.decoder);
            assert!(
                model.decoder.blocks[0].projections[0].weight.is_quantized(),
                "unmerge restores the quantized weight"
            );
            continue;
        }
        let _ = unmerge;
        // Exports are written from the UNMERGED base + adapter; compared with the merged model.
        let mut model = smollm(BaseDType::F32).unwrap().0;
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("merged-f32.gguf");
        write_merged_gguf(&model, Some(&adapter), &gguf, GgufQuant::F32, false).unwrap();
        {
            let (content, _) = read_gguf(&gguf);
            assert_eq!(md_str(&content, "general.architecture"), "llama");
            assert_eq!(md_u32(&content, "llama.block_count"), 30);
            assert_eq!(md_u32(&content, "llama.attention.head_count_kv"), 3);
            assert_eq!(md_u32(&content, "tokenizer.ggml.eos_token_id"), 2);
            assert!(content.metadata.contains_key("tokenizer.ggml.merges"));
            assert!(content.metadata.contains_key("tokenizer.chat_template"));
            assert!(!content.tensor_infos.contains_key("output.weight"), "tied");
        }
        let re = load_gguf(&gguf, BaseDType::F32, &Device::Cpu).unwrap();
        let d = max_abs_diff(&logits(&re, None, &SMOLLM_IDS), &merged);
        eprintln!("SmolLM2: merged GGUF f32 re-read vs in-memory merged max |Δlogit| {d:.2e}");
        assert!(d < 1e-4, "{d}");
        let text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n";
        assert_eq!(token_ids(&re, text), token_ids(&model, text));
        drop(re);
        std::fs::remove_file(&gguf).unwrap();

        let q8 = tmp.path().join("merged-q8.gguf");
        write_merged_gguf(&model, Some(&adapter), &q8, GgufQuant::Q8_0, false).unwrap();
        let re = load_gguf(&q8, BaseDType::Quantized, &Device::Cpu).unwrap();
        let got = logits(&re, None, &SMOLLM_IDS);
        let d = max_abs_diff(&got, &merged);
        let spread = merged.iter().fold(0f32, |m, x| m.max(x.abs()));
        let argmax = |v: &[f32]| -> Vec<usize> {
            v.chunks(49152)
                .map(|row| {
                    (0..row.len())
                        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                        .unwrap()
                })
                .collect()
        };
        let agree = argmax(&got)
            .iter()
            .zip(argmax(&merged))
            .filter(|(a, b)| **a == *b)
            .count();
        eprintln!("SmolLM2: merged GGUF q8_0 vs in-memory merged max |Δlogit| {d:.3} (max |logit| {spread:.1}), top-1 agrees at {agree}/{} positions", SMOLLM_IDS.len());
        assert!(d < 0.05 * spread, "{d}");
        assert!(agree >= SMOLLM_IDS.len() - 1);
        drop(re);
        std::fs::remove_file(&q8).unwrap();

        let hf = tmp.path().join("merged-hf");
        write_hf_dir(
            &model,
            Some(&adapter),
            &hf,
            &HfExportOptions {
                dtype: DType::F32,
                ..Default::default()
            },
        )
        .unwrap();
        let re = load_hf_dir(&hf, BaseDType::F32, &Device::Cpu).unwrap();
        let d = max_abs_diff(&logits(&re, None, &SMOLLM_IDS), &merged);
        eprintln!("SmolLM2: merged HF dir (f32) vs in-memory merged max |Δlogit| {d:.2e}");
        assert!(d < 1e-4, "{d}");
        assert_eq!(re.chat_template, model.chat_template);
        assert_eq!(re.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(token_ids(&re, text), token_ids(&model, text));
        // A GGUF written from an HF-dir base builds llama.cpp's gpt2 vocabulary from tokenizer.json.
        let from_hf = tmp.path().join("from-hf.gguf");
        write_merged_gguf(&re, None, &from_hf, GgufQuant::F16, false).unwrap();
        let (orig, _) = read_gguf(&real_model().unwrap());
        let (conv, _) = read_gguf(&from_hf);
        for key in [
            "tokenizer.ggml.model",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
        ] {
            let a = format!("{:?}", orig.metadata[key]);
            let b = format!("{:?}", conv.metadata[key]);
            assert!(a == b, "{key} differs from the original GGUF");
        }
        let back = load_gguf(&from_hf, BaseDType::F32, &Device::Cpu).unwrap();
        assert_eq!(token_ids(&back, text), token_ids(&model, text));
        let d = max_abs_diff(&logits(&back, None, &SMOLLM_IDS), &merged);
        eprintln!("SmolLM2: GGUF f16 written from the merged HF dir vs in-memory merged max |Δlogit| {d:.3}");
        assert!(d < 0.5, "{d}");
        let _ = merge_into(&mut model.decoder, &adapter).unwrap();
    }
}
