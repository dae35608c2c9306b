#include "core/job.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/toml_reader.h"

namespace sn {

int64_t ModelConfig::layer_parameter_count() const {
  // ln1, attention qkv + out, ln2, mlp in + out (weights and biases)
  int64_t d = d_model;
  return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * d_ff + d_ff) + (d_ff * d + d);
}

int64_t ModelConfig::parameter_count() const {
  return vocab * d_model + seq_len * d_model + layers * layer_parameter_count() + 2 * d_model;
}

double JobConfig::training_memory_bytes() const {
  const auto& m = model;
  const double tokens = static_cast<double>(std::max<int64_t>(1, sequences_per_micro_batch())) *
                        static_cast<double>(m.seq_len);
  // Per token and layer: the block's inputs, norms, q/k/v, attention output and MLP
  // hidden (about 8·d_model + 2·d_ff floats) and the attention weights (heads × seq_len,
  // twice); then the logits, their softmax and its gradient (3 × vocab).
  const double per_layer = 8.0 * static_cast<double>(m.d_model) + 2.0 * static_cast<double>(m.d_ff) +
                           2.0 * static_cast<double>(m.heads) * static_cast<double>(m.seq_len);
  const double activations =
      4.0 * tokens * (static_cast<double>(m.layers) * per_layer + 3.0 * static_cast<double>(m.vocab));
  return 16.0 * static_cast<double>(m.parameter_count()) + activations;
}

ModelConfig read_model_table(TomlTable& t) {
  ModelConfig m;
  m.layers = t.integer("layers", m.layers, 1, 4096);
  m.d_model = t.integer("d_model", m.d_model, 1, 1 << 16);
  m.heads = t.integer("heads", m.heads, 1, 1024);
  m.d_ff = t.integer("d_ff", 4 * m.d_model, 1, 1 << 20);
  m.vocab = t.integer("vocab", m.vocab, 16, 1 << 20);
  m.seq_len = t.integer("seq_len", m.seq_len, 2, 1 << 20);
  if (!t.failed() && m.d_model % m.heads != 0)
    t.fail("heads", fmt::format("model.d_model ({}) must be divisible by model.heads ({})",
                                m.d_model, m.heads));
  return m;
}

Status check_stages(const ModelConfig& model, int64_t stages, std::string_view what) {
  if (stages < 1 || stages > kMaxStages)
    return input_error("{} must be in [1, {}], got {}", what, kMaxStages, stages);
  // A stage holds at least one transformer block.
  if (stages > model.layers)
    return input_error("{} ({}) exceeds model.layers ({}): a stage holds at least one layer", what, stages,
                       model.layers);
  return ok_status();
}

static JobConfig read_job(TomlFile& file) {
  JobConfig job;
  TomlTable root = file.root();
  job.name = root.string("name", job.name);
  // The name starts the job's id, which nodes use in file names (checkpoints, buffers).
  if (!root.failed() && (job.name.empty() || job.name.size() > kMaxJobNameLength ||
                         job.name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") !=
                             std::string::npos || job.name.front() == '.'))
    root.fail("name", fmt::format("name must be 1 to {} of the characters A-Z a-z 0-9 . _ - (not starting with '.'), "
                                  "got \"{}\"", kMaxJobNameLength, job.name.substr(0, 80)));

  TomlTable model = root.table("model");
  job.model = read_model_table(model);
  model.reject_unknown_keys();

  TomlTable data = root.table("data");
  job.data.corpus = data.string("corpus", job.data.corpus);
  job.data.tokenizer_corpus = data.string("tokenizer_corpus", job.data.tokenizer_corpus);
  job.data.cache_dir = data.string("cache_dir", job.data.cache_dir);
  job.data.holdout_fraction = data.number("holdout_fraction", job.data.holdout_fraction, 0.0, 0.5);
  data.reject_unknown_keys();

  TomlTable parallel = root.table("parallel");
  auto& p = job.parallel;
  p.stages = parallel.integer("stages", p.stages, 1, kMaxStages);
  p.replicas = parallel.integer("replicas", p.replicas, 1, kMaxReplicas);
  p.micro_batches = parallel.integer("micro_batches", p.micro_batches, 1, 4096);
  p.schedule = parallel.choice("schedule", p.schedule, {"1f1b", "gpipe"});
  p.allreduce_chunk_bytes =
      parallel.integer("allreduce_chunk_bytes", p.allreduce_chunk_bytes, 1024, int64_t(1) << 30);
  if (!parallel.failed())
    if (auto shape = check_stages(job.model, p.stages, "parallel.stages"); !shape.ok())
      parallel.fail("stages", shape.message());
  parallel.reject_unknown_keys();

  TomlTable train = root.table("train");
  auto& t = job.train;
  t.global_batch = train.integer("global_batch", t.global_batch, 1, 1 << 24);
  t.steps = train.integer("steps", t.steps, 1, kMaxSteps);
  t.seed = static_cast<uint64_t>(train.integer("seed", static_cast<int64_t>(t.seed), 0, INT64_MAX));
  t.checkpoint_every = train.integer("checkpoint_every", t.checkpoint_every, 0, INT64_MAX);
  t.checkpoint_keep = train.integer("checkpoint_keep", t.checkpoint_keep, 1, 1000);
  t.lr = train.number("lr", t.lr, 0.0, 10.0);
  t.beta1 = train.number("beta1", t.beta1, 0.0, 0.999999);
  t.beta2 = train.number("beta2", t.beta2, 0.0, 0.999999);
  t.eps = train.number("eps", t.eps, 0.0, 1.0);
  t.weight_decay = train.number("weight_decay", t.weight_decay, 0.0, 10.0);
  t.warmup_steps = train.integer("warmup_steps", t.warmup_steps, 0, INT64_MAX);
  t.eval_every = train.integer("eval_every", t.eval_every, 0, INT64_MAX);
  if (!train.failed() && t.global_batch % (p.replicas * p.micro_batches) != 0)
    train.fail("global_batch",
               fmt::format("train.global_batch ({}) must be divisible by parallel.replicas × "
                           "parallel.micro_batches ({} × {})",
                           t.global_batch, p.replicas, p.micro_batches));
  train.reject_unknown_keys();

  TomlTable comp = root.table("compression");
  auto& c = job.compression;
  c.activations = comp.choice("activations", c.activations, {"none", "fp16", "quant", "aqsgd"});
  c.forward_bits = comp.integer("forward_bits", c.forward_bits, 2, 8);
  c.backward_bits = comp.integer("backward_bits", c.backward_bits, 2, 8);
  c.gradients = comp.choice("gradients", c.gradients, {"none", "fp16", "cocktail"});
  c.gradient_bits = comp.integer("gradient_bits", c.gradient_bits, 2, 8);
  c.random_fraction = comp.number("random_fraction", c.random_fraction, 1e-6, 1.0);
  c.topk_fraction = comp.number("topk_fraction", c.topk_fraction, 1e-6, 1.0);
  comp.reject_unknown_keys();

  if (root.has("verify")) {
    TomlTable verify = root.table("verify");
    auto& v = job.verify;
    v.enabled = true;
    const int64_t default_segment = t.checkpoint_every > 0 ? t.checkpoint_every : 10;
    v.segment_steps = verify.integer("segment_steps", default_segment, 1, kMaxSteps);
    v.commit_every = verify.integer("commit_every", v.commit_every, 0, kMaxSteps);
    verify.reject_unknown_keys();
  }

  if (root.has("diloco")) {
    TomlTable diloco = root.table("diloco");
    auto& d = job.diloco;
    d.enabled = true;
    d.inner_steps = diloco.integer("inner_steps", d.inner_steps, 1, kMaxSteps);
    d.outer_lr = diloco.number("outer_lr", d.outer_lr, 1e-6, 10.0);
    d.outer_momentum = diloco.number("outer_momentum", d.outer_momentum, 0.0, 0.999999);
    d.pseudo_grad = diloco.choice("pseudo_grad", d.pseudo_grad, {"int8", "fp32"});
    // The replicas part ways between outer steps: there is nothing to verify
    // step by step against a peer, and no every-step gradient to compress.
    if (!diloco.failed() && job.verify.enabled)
      diloco.fail_here("[diloco] cannot be combined with [verify] (DiLoCo jobs are not verifiable yet)");
    if (!diloco.failed() && c.gradients != "none")
      diloco.fail_here(fmt::format("[diloco] needs compression.gradients = \"none\" (got \"{}\"): "
                                             "groups exchange no gradients, only pseudo-gradients",
                                             c.gradients));
    diloco.reject_unknown_keys();
  }

  if (root.has("privacy")) {
    TomlTable priv = root.table("privacy");
    auto& v = job.privacy;
    v.enabled = true;
    v.secure_aggregation = priv.boolean("secure_aggregation", v.secure_aggregation);
    v.threshold = priv.integer("threshold", v.threshold, 0, kMaxReplicas);
    v.fixed_point_range = priv.number("fixed_point_range", v.fixed_point_range, 1e-6, 1e6);
    v.dp = priv.boolean("dp", v.dp);
    v.clip_norm = priv.number("clip_norm", v.clip_norm, 1e-9, 1e9);
    v.noise_multiplier = priv.number("noise_multiplier", v.noise_multiplier, 0.0, 1e6);
    v.target_epsilon = priv.number("target_epsilon", v.target_epsilon, 0.0, 1e6);
    v.delta = priv.number("delta", v.delta, 1e-300, 0.999999);
    if (!priv.failed() && v.secure_aggregation) {
      if (p.replicas < 2)
        priv.fail("secure_aggregation", "privacy.secure_aggregation needs parallel.replicas ≥ 2 (it hides each "
                                        "replica's gradient inside their sum)");
      else if (v.threshold != 0 && !(2 * v.threshold > p.replicas && v.threshold <= p.replicas))
        priv.fail("threshold", fmt::format("privacy.threshold must be in ({}, {}] (more than half the replicas), got {}",
                                           p.replicas / 2.0, p.replicas, v.threshold));
      else if (c.gradients == "cocktail")
        priv.fail("secure_aggregation",
                  "privacy.secure_aggregation does not combine with compression.gradients = \"cocktail\": its "
                  "top-k sparsification tells every replica which coordinates were large; use gradients = \"none\" "
                  "(secure aggregation sends 32-bit fixed point)");
      else if (c.gradients == "fp16")
        priv.fail("secure_aggregation",
                  "privacy.secure_aggregation does not combine with compression.gradients = \"fp16\": masked values "
                  "must be fixed point in Z_2^32 (that is its quantization); use gradients = \"none\"");
    }
    // A setting whose switch is off would be ignored in silence.
    if (!priv.failed() && !v.dp)
      for (const char* key : {"clip_norm", "noise_multiplier", "target_epsilon", "delta"})
        if (priv.has(key)) {
          priv.fail(key, fmt::format("privacy.{} is set but privacy.dp is not true (it would be ignored)", key));
          break;
        }
    if (!priv.failed() && !v.secure_aggregation)
      for (const char* key : {"threshold", "fixed_point_range"})
        if (priv.has(key)) {
          priv.fail(key, fmt::format("privacy.{} is set but privacy.secure_aggregation is not true (it would be "
                                     "ignored)",
                                     key));
          break;
        }
    if (!priv.failed() && v.dp) {
      if ((v.noise_multiplier > 0) == (v.target_epsilon > 0))
        priv.fail("dp", "privacy.dp needs exactly one of noise_multiplier > 0 or target_epsilon > 0");
    }
    // A replay of a masked sum would need the replica's own pairwise secrets,
    // and with them the verifier could unmask that replica's gradient.
    if (!priv.failed() && v.secure_aggregation && job.verify.enabled)
      priv.fail("secure_aggregation",
                "privacy.secure_aggregation cannot be combined with [verify]: replaying a masked sum needs the "
                "replica's pairwise secrets, which would let the verifier unmask its gradient (dp alone is "
                "verifiable)");
    if (!priv.failed() && job.diloco.enabled)
      priv.fail_here("[privacy] does not combine with [diloco] yet: DiLoCo groups exchange pseudo-gradients, not "
                     "the every-step gradients that secure aggregation and DP-SGD protect");
    if (!priv.failed() && !v.dp && !v.secure_aggregation)
      priv.fail_here("[privacy] turns on nothing: set secure_aggregation = true and/or dp = true");
    priv.reject_unknown_keys();
  }

  root.reject_unknown_keys();
  return job;
}

Result<JobConfig> parse_job_string(std::string_view text, const std::string& display_name) {
  SN_ASSIGN(TomlFile file, TomlFile::parse_string(text, display_name));
  JobConfig job = read_job(file);
  SN_TRY(file.status());
  job.source = display_name;
  return job;
}

Result<JobConfig> parse_job_file(const std::filesystem::path& path) {
  SN_ASSIGN(TomlFile file, TomlFile::parse_file(path));
  JobConfig job = read_job(file);
  SN_TRY(file.status());
  job.source = path;
  // Relative data paths are relative to the job file, so a job can ship its data.
  auto resolve = [&](std::string& value) {
    if (!value.empty() && value != "fortunes" && std::filesystem::path(value).is_relative())
      value = (path.parent_path() / value).lexically_normal().string();
  };
  resolve(job.data.corpus);
  resolve(job.data.tokenizer_corpus);
  if (!job.data.cache_dir.empty()) resolve(job.data.cache_dir);
  return job;
}

Result<JobConfig> override_job_integer(const JobConfig& job, std::string_view key, int64_t value,
                                       std::string_view flag) {
  JobConfig changed = job;
  const std::pair<std::string_view, int64_t*> fields[] = {
      {"train.steps", &changed.train.steps},
      {"train.global_batch", &changed.train.global_batch},
      {"train.checkpoint_every", &changed.train.checkpoint_every},
      {"train.eval_every", &changed.train.eval_every},
      {"parallel.stages", &changed.parallel.stages},
      {"parallel.replicas", &changed.parallel.replicas},
      {"parallel.micro_batches", &changed.parallel.micro_batches}};
  int64_t* field = nullptr;
  for (const auto& [name, target] : fields)
    if (name == key) field = target;
  if (!field) return make_error("override_job_integer: {} is not an overridable field", key);
  *field = value;
  // The job is re-read with the value in place, so the job file's every range and
  // cross-field rule applies (data paths are absolute by now and stay as they are).
  auto reread = parse_job_string(job_to_toml(changed), "override");
  if (!reread.ok()) {
    // "override:LINE: what" → "FLAG: what": the line is of the generated text, not the user's.
    std::string message = reread.message();
    if (auto colon = message.find(": "); colon != std::string::npos) message = message.substr(colon + 2);
    return input_error("{} {}: {}", flag, value, message);
  }
  reread->source = job.source;
  return reread;
}

std::string job_to_toml(const JobConfig& j) {
  auto q = [](const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') out.push_back('\\');
      out.push_back(c);
    }
    return out + "\"";
  };
  std::string out;
  out += fmt::format("name = {}\n\n", q(j.name));
  out += fmt::format("[model]\nlayers = {}\nd_model = {}\nheads = {}\nd_ff = {}\nvocab = {}\nseq_len = {}\n\n",
                     j.model.layers, j.model.d_model, j.model.heads, j.model.d_ff, j.model.vocab,
                     j.model.seq_len);
  out += fmt::format("[data]\ncorpus = {}\ntokenizer_corpus = {}\ncache_dir = {}\nholdout_fraction = {:.17g}\n\n",
                     q(j.data.corpus), q(j.data.tokenizer_corpus), q(j.data.cache_dir), j.data.holdout_fraction);
  out += fmt::format("[parallel]\nstages = {}\nreplicas = {}\nmicro_batches = {}\nschedule = {}\nallreduce_chunk_bytes = {}\n\n",
                     j.parallel.stages, j.parallel.replicas, j.parallel.micro_batches,
                     q(j.parallel.schedule), j.parallel.allreduce_chunk_bytes);
  out += fmt::format("[train]\nglobal_batch = {}\nsteps = {}\nseed = {}\ncheckpoint_every = {}\ncheckpoint_keep = {}\n"
                     "lr = {:.17g}\nbeta1 = {:.17g}\nbeta2 = {:.17g}\neps = {:.17g}\n"
                     "weight_decay = {:.17g}\nwarmup_steps = {}\neval_every = {}\n\n",
                     j.train.global_batch, j.train.steps, j.train.seed, j.train.checkpoint_every, j.train.checkpoint_keep,
                     j.train.lr, j.train.beta1, j.train.beta2, j.train.eps, j.train.weight_decay,
                     j.train.warmup_steps, j.train.eval_every);
  out += fmt::format("[compression]\nactivations = {}\nforward_bits = {}\nbackward_bits = {}\n"
                     "gradients = {}\ngradient_bits = {}\nrandom_fraction = {:.17g}\ntopk_fraction = {:.17g}\n",
                     q(j.compression.activations), j.compression.forward_bits,
                     j.compression.backward_bits, q(j.compression.gradients),
                     j.compression.gradient_bits, j.compression.random_fraction,
                     j.compression.topk_fraction);
  if (j.verify.enabled)
    out += fmt::format("\n[verify]\nsegment_steps = {}\ncommit_every = {}\n", j.verify.segment_steps,
                       j.verify.commit_every);
  if (j.diloco.enabled)
    out += fmt::format("\n[diloco]\ninner_steps = {}\nouter_lr = {:.17g}\nouter_momentum = {:.17g}\npseudo_grad = {}\n",
                       j.diloco.inner_steps, j.diloco.outer_lr, j.diloco.outer_momentum, q(j.diloco.pseudo_grad));
  if (j.privacy.enabled) {
    // Only the keys whose switch is on: the reader refuses the others.
    const auto& v = j.privacy;
    out += fmt::format("\n[privacy]\nsecure_aggregation = {}\ndp = {}\n", v.secure_aggregation, v.dp);
    if (v.secure_aggregation)
      out += fmt::format("threshold = {}\nfixed_point_range = {:.17g}\n", v.threshold, v.fixed_point_range);
    if (v.dp)
      out += fmt::format("clip_norm = {:.17g}\nnoise_multiplier = {:.17g}\ntarget_epsilon = {:.17g}\ndelta = {:.17g}\n",
                         v.clip_norm, v.noise_multiplier, v.target_epsilon, v.delta);
  }
  return out;
}

}  // namespace sn
