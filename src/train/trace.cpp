#include "train/trace.h"

#include <cstring>

#include "chain/chain.h"
#include "model/tensor_wire.h"
#include "train/evidence.h"
#include "train/hashing.h"
#include "train/state.h"

namespace sn::train {
namespace {

using hashing::put_string;

void put_u32_be(std::vector<uint8_t>& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(v >> shift));
}

void put_raw(std::vector<uint8_t>& out, std::span<const uint8_t> bytes) { out.insert(out.end(), bytes.begin(), bytes.end()); }

// The twelve tensors of one block, in model order.
const char* const kBlockParts[] = {"ln1.weight",   "ln1.bias",       "attn.qkv.weight", "attn.qkv.bias",
                                   "attn.proj.weight", "attn.proj.bias", "ln2.weight",  "ln2.bias",
                                   "mlp.fc.weight", "mlp.fc.bias",   "mlp.proj.weight", "mlp.proj.bias"};

std::vector<std::string> block_weight_names(int layer) {
  std::vector<std::string> names;
  for (const char* part : kBlockParts) names.push_back("blocks." + std::to_string(layer) + "." + part);
  return names;
}

std::string grad_name(const std::string& parameter) { return "grad." + parameter; }
std::string hidden(int micro, int layer) { return "hidden." + std::to_string(micro) + "." + std::to_string(layer); }
std::string dhidden(int micro, int layer) { return "dhidden." + std::to_string(micro) + "." + std::to_string(layer); }
std::string indexed(const char* what, int micro) { return std::string(what) + "." + std::to_string(micro); }

Hash256 digest_of(const torch::Tensor& t) {
  Hash256 out{};
  torch::Tensor c = t.contiguous();
  if (c.scalar_type() == torch::kUInt8 && c.numel() == 32) std::memcpy(out.data(), c.data_ptr(), 32);
  return out;
}

std::string message_name(const char* direction, const net::Tag& tag, int peer) {
  return fmt::format("msg.{}.{}.{}.{}.{}.{}", direction, tag.kind, tag.micro, tag.round, tag.chunk, peer);
}

}  // namespace

Hash256 tensor_hash(const torch::Tensor& tensor) {
  Hasher h;
  put_string(h, "solvernet/tensor/v1");
  hashing::put_tensor(h, tensor);
  return h.finish();
}

bool is_digest_value(std::string_view name) {
  return name == "state" || name == "inbound" || name == "outbound" || name == "leaf" || name == "leaf_prev" ||
         name == "request" || name.starts_with("msg.");
}

torch::Tensor digest_tensor(const Hash256& digest) {
  torch::Tensor t = torch::empty({32}, torch::kUInt8);
  std::memcpy(t.data_ptr(), digest.data(), 32);
  return t;
}

Hash256 value_hash(std::string_view name, const torch::Tensor& t) {
  if (is_digest_value(name) && t.scalar_type() == torch::kUInt8 && t.numel() == 32) return digest_of(t);
  return tensor_hash(t);
}

Hash256 record_hash(const OpRecord& record) {
  std::vector<uint8_t> bytes;
  put_raw(bytes, as_bytes("solvernet/op/v1"));
  put_raw(bytes, keccak256(record.kind));
  put_u32_be(bytes, record.layer);
  put_u32_be(bytes, record.micro);
  for (const auto* values : {&record.inputs, &record.outputs}) {
    put_u32_be(bytes, static_cast<uint32_t>(values->size()));
    for (const OpValue& v : *values) {
      put_raw(bytes, keccak256(v.name));
      put_raw(bytes, v.hash);
    }
  }
  return keccak256(bytes);
}

// The contract rebuilds r_0 and checks links: one implementation, chain's.
Hash256 chain_start(const Hash256& leaf_prev) { return chain::ops_start(leaf_prev); }

Hash256 chain_next(const Hash256& previous, const Hash256& record) { return chain::ops_link(previous, record); }

Status check_inputs_from_prefix(const Trace& trace, size_t j) {
  if (j >= trace.records.size()) return kind_error(ErrorKind::invalid_input, "no op {} in a trace of {}", j + 1, trace.records.size());
  std::map<std::string, Hash256> latest;
  latest["leaf_prev"] = trace.leaf_prev;
  for (size_t i = 0; i < j; ++i)
    for (const OpValue& out : trace.records[i].outputs) latest[out.name] = out.hash;
  const OpRecord& r = trace.records[j];
  for (const OpValue& in : r.inputs) {
    auto it = latest.find(in.name);
    if (it == latest.end())
      return kind_error(ErrorKind::bad_peer, "op {} ({} layer {} micro {}): input {} is no earlier op's output", j + 1,
                        r.kind, r.layer, r.micro, in.name);
    if (it->second != in.hash)
      return kind_error(ErrorKind::bad_peer, "op {} ({} layer {} micro {}): input {} is not the latest {} before it",
                        j + 1, r.kind, r.layer, r.micro, in.name, in.name);
  }
  return ok_status();
}

Status check_chain(const Trace& trace) {
  if (trace.chain.size() != trace.records.size() + 1)
    return kind_error(ErrorKind::bad_peer, "a trace of {} ops has {} chain hashes", trace.records.size(), trace.chain.size());
  Hash256 r = chain_start(trace.leaf_prev);
  if (r != trace.chain[0]) return kind_error(ErrorKind::bad_peer, "r_0 is not K(\"solvernet/ops/v1\" ‖ leaf_prev)");
  for (size_t j = 0; j < trace.records.size(); ++j) {
    r = chain_next(r, record_hash(trace.records[j]));
    if (r != trace.chain[j + 1]) return kind_error(ErrorKind::bad_peer, "r_{} does not follow from r_{} and op {}", j + 1, j, j + 1);
  }
  return ok_status();
}

Result<OpContext> op_context_of(const solvernet::v1::SetupJobRequest& setup, int64_t t) {
  OpContext context;
  SN_ASSIGN(context.job, parse_job_string(setup.job_toml(), "job of the setup"));
  context.first_layer = setup.first_layer();
  context.layer_count = setup.layer_count();
  context.step = t;
  if (context.first_layer < 0 || context.layer_count < 1 || context.first_layer + context.layer_count > context.job.model.layers)
    return kind_error(ErrorKind::invalid_input, "setup: layers [{}, {}) are outside the model's {}", context.first_layer,
                      context.first_layer + context.layer_count, context.job.model.layers);
  return context;
}

bool recomputable(std::string_view kind) {
  return kind == "embed.fwd" || kind == "block.fwd" || kind == "head.fwd" || kind == "embed.bwd" ||
         kind == "block.bwd" || kind == "head.bwd" || kind == "adam" || kind == "commit";
}

Status check_inputs(const OpRecord& record, const std::map<std::string, torch::Tensor>& inputs) {
  for (const OpValue& in : record.inputs) {
    auto it = inputs.find(in.name);
    if (it == inputs.end()) return kind_error(ErrorKind::bad_peer, "{}: input {} is missing", record.kind, in.name);
    if (value_hash(in.name, it->second) != in.hash)
      return kind_error(ErrorKind::bad_peer, "{}: input {} does not have the hash the record names", record.kind, in.name);
  }
  return ok_status();
}

Result<std::map<std::string, torch::Tensor>> op_inputs(const Trace& trace, size_t j) {
  if (j >= trace.records.size()) return kind_error(ErrorKind::invalid_input, "no op {} in a trace of {}", j + 1, trace.records.size());
  std::map<std::string, torch::Tensor> out;
  for (const OpValue& in : trace.records[j].inputs) {
    auto it = trace.tensors.find(in.hash);
    if (it == trace.tensors.end())
      return kind_error(ErrorKind::not_found, "op {}: no tensor {} ({}) in the trace", j + 1, in.name, to_hex(in.hash).substr(0, 16));
    out[in.name] = it->second;
  }
  return out;
}

namespace {

// The pieces of one recomputation: named inputs in, named outputs out.
class Recompute {
 public:
  Recompute(const OpContext& context, const OpRecord& record, const std::map<std::string, torch::Tensor>& inputs)
      : context_(context), record_(record), inputs_(inputs) {}

  Result<torch::Tensor> get(const std::string& name) const {
    auto it = inputs_.find(name);
    if (it == inputs_.end()) return kind_error(ErrorKind::bad_peer, "{}: input {} is missing", record_.kind, name);
    return it->second;
  }
  // The one input whose name starts with PREFIX (an activation or its gradient).
  Result<std::string> name_with(std::string_view prefix) const {
    for (const OpValue& in : record_.inputs)
      if (in.name.starts_with(prefix)) return in.name;
    return kind_error(ErrorKind::bad_peer, "{}: names no {}* input", record_.kind, prefix);
  }
  Result<NamedTensors> weights(const std::vector<std::string>& names) const {
    NamedTensors out;
    for (const auto& name : names) {
      SN_ASSIGN(auto t, get(name));
      out.emplace_back(name, t);
    }
    return out;
  }
  std::unique_ptr<model::StageModel> model(const NamedTensors& weights) const {
    return model::StageModel::with_weights(context_.job.model, context_.first_layer, context_.layer_count, weights);
  }
  // A leaf copy of an activation that gathers its gradient.
  static torch::Tensor leaf(const torch::Tensor& t) { return t.detach().clone().requires_grad_(true); }
  void set(const std::string& name, const torch::Tensor& value) { results_[name] = value.detach(); }
  // BEFORE + this micro-batch's gradient G, as autograd accumulates it.
  Status accumulate(const std::string& parameter, const torch::Tensor& g) {
    SN_ASSIGN(auto before, get(grad_name(parameter)));
    if (!g.defined()) return kind_error(ErrorKind::internal, "{}: {} got no gradient", record_.kind, parameter);
    set(grad_name(parameter), before + g);
    return ok_status();
  }
  Result<std::vector<OpValue>> outputs() const {
    std::vector<OpValue> out;
    for (const OpValue& o : record_.outputs) {
      auto it = results_.find(o.name);
      if (it == results_.end()) return kind_error(ErrorKind::bad_peer, "{}: names an output {} it does not make", record_.kind, o.name);
      out.push_back({o.name, value_hash(o.name, it->second)});
    }
    return out;
  }
  const std::map<std::string, torch::Tensor>& results() const { return results_; }

 private:
  const OpContext& context_;
  const OpRecord& record_;
  const std::map<std::string, torch::Tensor>& inputs_;
  std::map<std::string, torch::Tensor> results_;
};

const std::vector<std::string> kHeadWeights = {"ln_f.weight", "ln_f.bias", "wte.weight"};
const std::vector<std::string> kEmbedWeights = {"wte.weight", "wpe.weight"};

// The last stage's backward of one micro-batch: (scaled loss).backward()
// through ln_f and the tied head, as StageWorker::backward_micro runs it.
struct HeadGrads {
  torch::Tensor dx;
  std::map<std::string, torch::Tensor> grads;  // this micro-batch's, not accumulated
};
HeadGrads head_backward(const OpContext& context, const NamedTensors& weights, const torch::Tensor& x_in,
                        const torch::Tensor& targets) {
  torch::AutoGradMode grad_mode(true);
  auto model = model::StageModel::with_weights(context.job.model, context.first_layer, context.layer_count, weights);
  torch::Tensor x = x_in.detach().clone().requires_grad_(true);
  const double scale = 1.0 / static_cast<double>(context.job.parallel.micro_batches * context.job.parallel.replicas);
  (model::lm_loss(model->head(x), targets) * scale).backward();
  HeadGrads out{x.grad(), {}};
  for (const auto& [name, p] : model->named_parameters()) out.grads[name] = p.grad();
  return out;
}

Result<std::vector<OpValue>> recompute(const OpContext& context, const OpRecord& record,
                                       const std::map<std::string, torch::Tensor>& inputs) {
  Recompute rc(context, record, inputs);
  const int micro = static_cast<int>(record.micro), layer = static_cast<int>(record.layer);
  const int end = context.first_layer + context.layer_count;
  torch::AutoGradMode grad_mode(true);
  const std::string& kind = record.kind;
  if (kind == "embed.fwd") {
    SN_ASSIGN(auto weights, rc.weights(kEmbedWeights));
    SN_ASSIGN(auto tokens, rc.get(indexed("tokens", micro)));
    rc.set(hidden(micro, 0), rc.model(weights)->embed(tokens));
  } else if (kind == "block.fwd") {
    SN_ASSIGN(auto weights, rc.weights(block_weight_names(layer)));
    SN_ASSIGN(auto x, rc.get(hidden(micro, layer)));
    rc.set(hidden(micro, layer + 1), rc.model(weights)->block(layer, x));
  } else if (kind == "head.fwd") {
    SN_ASSIGN(auto weights, rc.weights(kHeadWeights));
    SN_ASSIGN(auto x, rc.get(hidden(micro, end)));
    SN_ASSIGN(auto targets, rc.get(indexed("targets", micro)));
    torch::Tensor logits = rc.model(weights)->head(x);
    rc.set(indexed("logits", micro), logits);
    rc.set(indexed("loss", micro), model::lm_loss(logits, targets));
  } else if (kind == "head.bwd") {
    SN_ASSIGN(auto weights, rc.weights(kHeadWeights));
    SN_ASSIGN(auto x, rc.get(hidden(micro, end)));
    SN_ASSIGN(auto targets, rc.get(indexed("targets", micro)));
    HeadGrads head = head_backward(context, weights, x, targets);
    rc.set(dhidden(micro, end), head.dx);
    for (const char* name : {"ln_f.weight", "ln_f.bias"}) SN_TRY(rc.accumulate(name, head.grads.at(name)));
    // A last stage that is also the first adds the head's and the embedding's
    // wte gradients before accumulating (one autograd leaf): hand it on.
    if (context.is_first())
      rc.set(indexed("dwte.head", micro), head.grads.at("wte.weight"));
    else
      SN_TRY(rc.accumulate("wte.weight", head.grads.at("wte.weight")));
  } else if (kind == "block.bwd") {
    const auto names = block_weight_names(layer);
    SN_ASSIGN(auto weights, rc.weights(names));
    SN_ASSIGN(auto x_in, rc.get(hidden(micro, layer)));
    SN_ASSIGN(auto dy, rc.get(dhidden(micro, layer + 1)));
    auto model = rc.model(weights);
    torch::Tensor x = Recompute::leaf(x_in);
    model->block(layer, x).backward(dy);
    rc.set(dhidden(micro, layer), x.grad());
    const auto named = model->named_parameters();
    std::map<std::string, torch::Tensor> params(named.begin(), named.end());
    for (const auto& name : names) SN_TRY(rc.accumulate(name, params.at(name).grad()));
  } else if (kind == "embed.bwd") {
    // An embedding's backward does not read its weights: zeros of their
    // shapes stand in, so the op needs none of them.
    NamedTensors weights;
    for (const auto& name : kEmbedWeights) {
      SN_ASSIGN(auto before, rc.get(grad_name(name)));
      weights.emplace_back(name, torch::zeros_like(before));
    }
    SN_ASSIGN(auto tokens, rc.get(indexed("tokens", micro)));
    SN_ASSIGN(auto dx, rc.get(dhidden(micro, 0)));
    auto model = rc.model(weights);
    model->embed(tokens).backward(dx);
    const auto named = model->named_parameters();
    std::map<std::string, torch::Tensor> params(named.begin(), named.end());
    torch::Tensor wte_grad = params.at("wte.weight").grad();
    if (context.is_last()) {
      SN_ASSIGN(auto head_part, rc.get(indexed("dwte.head", micro)));
      wte_grad = head_part + wte_grad;
    }
    SN_TRY(rc.accumulate("wte.weight", wte_grad));
    SN_TRY(rc.accumulate("wpe.weight", params.at("wpe.weight").grad()));
  } else if (kind == "adam") {
    // One parameter through the same AdamW as training, at the same step:
    // every parameter's update is independent of the others.
    if (record.outputs.empty()) return kind_error(ErrorKind::bad_peer, "adam: names no outputs");
    const std::string& name = record.outputs[0].name;
    SN_ASSIGN(auto p_in, rc.get(name));
    SN_ASSIGN(auto g, rc.get(grad_name(name)));
    SN_ASSIGN(auto m, rc.get("adam.m." + name));
    SN_ASSIGN(auto v, rc.get("adam.v." + name));
    SN_ASSIGN(auto step, rc.get("adam.step"));
    if (step.numel() != 1 || step.scalar_type() != torch::kInt64)
      return kind_error(ErrorKind::bad_peer, "adam: adam.step is not one I64");
    torch::Tensor p = p_in.detach().clone().requires_grad_(true);
    AdamW optimizer({{name, p}}, context.job.train);
    SN_TRY(optimizer.load_state({{"adam.m." + name, m}, {"adam.v." + name, v}, {"adam.step", step}}));
    p.mutable_grad() = g.detach().clone();
    optimizer.step(step.item<int64_t>());
    auto state = optimizer.state();
    rc.set(name, p);
    rc.set("adam.m." + name, state[0].second);
    rc.set("adam.v." + name, state[1].second);
  } else if (kind == "commit") {
    SN_ASSIGN(auto state, rc.get("state"));
    SN_ASSIGN(auto inbound, rc.get("inbound"));
    SN_ASSIGN(auto outbound, rc.get("outbound"));
    rc.set("leaf", digest_tensor(step_leaf(context.step, digest_of(state), digest_of(inbound), digest_of(outbound))));
  } else {
    return kind_error(ErrorKind::unavailable, "op {} needs a step replay: only the step's trace up to it can rule", kind);
  }
  return rc.outputs();
}

}  // namespace

Result<std::vector<OpValue>> recompute_op(const OpContext& context, const OpRecord& record,
                                          const std::map<std::string, torch::Tensor>& inputs) {
  // Inputs come from a party to the dispute: a wrong shape or dtype must be
  // an error, not a LibTorch exception.
  try {
    return recompute(context, record, inputs);
  } catch (const c10::Error& e) {
    return kind_error(ErrorKind::bad_peer, "{} (layer {}, micro {}): its inputs do not fit: {}", record.kind, record.layer,
                      record.micro, e.msg().substr(0, e.msg().find('\n')));
  } catch (const std::out_of_range&) {
    return kind_error(ErrorKind::bad_peer, "{} (layer {}, micro {}): a weight it needs is missing", record.kind,
                      record.layer, record.micro);
  }
}

// ---- the tracer -------------------------------------------------------------

StepTracer::StepTracer(OpContext context, const Hash256& leaf_prev) : context_(std::move(context)) {
  trace_.step = context_.step;
  trace_.leaf_prev = leaf_prev;
  trace_.tensors.emplace(leaf_prev, digest_tensor(leaf_prev));
}

OpValue StepTracer::put(const std::string& name, const torch::Tensor& value) {
  torch::Tensor copy = value.detach().clone().contiguous();
  Hash256 h = value_hash(name, copy);
  trace_.tensors.emplace(h, copy);
  latest_[name] = h;
  return {name, h};
}

OpValue StepTracer::latest(const std::string& name) const {
  auto it = latest_.find(name);
  // An unknown name gets the zero hash: the prefix check then names it.
  return {name, it == latest_.end() ? Hash256{} : it->second};
}

torch::Tensor StepTracer::stored(const std::string& name) const {
  auto it = trace_.tensors.find(latest(name).hash);
  return it == trace_.tensors.end() ? torch::Tensor() : it->second;
}

void StepTracer::add(OpRecord record) { trace_.records.push_back(std::move(record)); }

std::vector<std::string> StepTracer::block_weights(int layer) const { return block_weight_names(layer); }

void StepTracer::begin(const solvernet::v1::RunStepRequest& request, const TrainingState& state,
                       const NamedTensors& parameters) {
  began_ = true;
  parameters_ = parameters;
  request_ = request;
  OpRecord start{"start", 0, 0, {{"leaf_prev", trace_.leaf_prev}}, {}};
  for (const auto* list : {&state.weights, &state.optimizer, &state.residuals})
    for (const auto& [name, t] : *list) start.outputs.push_back(put(name, t));
  for (const auto& [name, p] : parameters) start.outputs.push_back(put(grad_name(name), p.grad()));
  start.outputs.push_back(put("request", digest_tensor(step_request_digest(request))));
  add(std::move(start));
}

void StepTracer::on_input(int micro, const torch::Tensor& input) {
  if (!began_) return;
  current_micro_ = micro;
  const auto m = static_cast<uint32_t>(micro);
  if (context_.is_first() || context_.is_last()) {
    OpRecord batch{"batch", 0, m, {latest("request")}, {}};
    const int64_t b = context_.job.sequences_per_micro_batch(), seq = context_.job.model.seq_len;
    if (context_.is_first()) batch.outputs.push_back(put(indexed("tokens", micro), input));
    if (context_.is_last()) {
      auto targets = model::tensor_from_proto(request_.micro_batches(micro).targets(), torch::kInt64,
                                              std::vector<int64_t>{b, seq});
      // The worker refuses such a batch right after; the trace just records it.
      if (targets.ok()) batch.outputs.push_back(put(indexed("targets", micro), *targets));
    }
    add(std::move(batch));
  }
  if (!context_.is_first()) {
    add({"recv", 0, m, {}, {put(hidden(micro, context_.first_layer), input)}});
    message_records_[{"act", micro}] = trace_.records.size() - 1;
  }
}

void StepTracer::on_forward(Part part, int layer, const torch::Tensor& in, const torch::Tensor& out) {
  if (!began_) return;
  const int micro = current_micro_;
  const auto m = static_cast<uint32_t>(micro);
  auto capture = [this, micro](int at) {
    return [this, micro, at](const torch::Tensor& gradient) {
      micros_[micro].boundary_gradients[at] = gradient.detach().clone();
    };
  };
  switch (part) {
    case Part::embed: {
      OpRecord r{"embed.fwd", 0, m, {latest("wte.weight"), latest("wpe.weight"), latest(indexed("tokens", micro))}, {}};
      r.outputs.push_back(put(hidden(micro, 0), out));
      add(std::move(r));
      break;
    }
    case Part::block: {
      OpRecord r{"block.fwd", static_cast<uint32_t>(layer), m, {}, {}};
      for (const auto& name : block_weights(layer)) r.inputs.push_back(latest(name));
      r.inputs.push_back(latest(hidden(micro, layer)));
      r.outputs.push_back(put(hidden(micro, layer + 1), out));
      add(std::move(r));
      // The gradient w.r.t. each block boundary, as backward produces it; a
      // hook that returns nothing leaves the gradient as it is.
      if (in.requires_grad()) in.register_hook(capture(layer));
      if (layer + 1 == context_.first_layer + context_.layer_count && out.requires_grad())
        out.register_hook(capture(layer + 1));
      break;
    }
    case Part::head:
      micros_[micro].logits = out.detach().clone();
      break;
  }
}

void StepTracer::on_loss(int micro, const torch::Tensor& loss) {
  if (!began_) return;
  const int end = context_.first_layer + context_.layer_count;
  OpRecord r{"head.fwd", 0, static_cast<uint32_t>(micro), {}, {}};
  for (const auto& name : kHeadWeights) r.inputs.push_back(latest(name));
  r.inputs.push_back(latest(hidden(micro, end)));
  r.inputs.push_back(latest(indexed("targets", micro)));
  r.outputs.push_back(put(indexed("logits", micro), micros_[micro].logits));
  r.outputs.push_back(put(indexed("loss", micro), loss));
  micros_[micro].logits = torch::Tensor();
  add(std::move(r));
}

void StepTracer::on_output_gradient(int micro, const torch::Tensor& gradient) {
  if (!began_) return;
  const int end = context_.first_layer + context_.layer_count;
  add({"recv", 0, static_cast<uint32_t>(micro), {}, {put(dhidden(micro, end), gradient)}});
  message_records_[{"grad", micro}] = trace_.records.size() - 1;
}

void StepTracer::on_backward(int micro) {
  if (!began_) return;
  const int end = context_.first_layer + context_.layer_count;
  const auto m = static_cast<uint32_t>(micro);
  std::map<std::string, torch::Tensor> grads;
  for (const auto& [name, p] : parameters_) grads[name] = p.grad();
  Micro& mb = micros_[micro];
  auto boundary = [&](int at) {
    auto it = mb.boundary_gradients.find(at);
    return it == mb.boundary_gradients.end() ? torch::Tensor() : it->second;
  };
  if (context_.is_last()) {
    OpRecord r{"head.bwd", 0, m, {}, {}};
    for (const auto& name : kHeadWeights) r.inputs.push_back(latest(name));
    r.inputs.push_back(latest(hidden(micro, end)));
    r.inputs.push_back(latest(indexed("targets", micro)));
    r.inputs.push_back(latest(grad_name("ln_f.weight")));
    r.inputs.push_back(latest(grad_name("ln_f.bias")));
    if (!context_.is_first()) r.inputs.push_back(latest(grad_name("wte.weight")));
    r.outputs.push_back(put(dhidden(micro, end), boundary(end)));
    r.outputs.push_back(put(grad_name("ln_f.weight"), grads.at("ln_f.weight")));
    r.outputs.push_back(put(grad_name("ln_f.bias"), grads.at("ln_f.bias")));
    if (!context_.is_first()) {
      r.outputs.push_back(put(grad_name("wte.weight"), grads.at("wte.weight")));
    } else {
      // The head's share of the tied embedding's gradient never exists on its
      // own in training (autograd adds it to the embedding's share first), so
      // it is recomputed here from the recorded inputs; embed.bwd's output,
      // which training does produce, then checks it.
      NamedTensors weights;
      for (const auto& name : kHeadWeights) weights.emplace_back(name, stored(name));
      HeadGrads head = head_backward(context_, weights, stored(hidden(micro, end)), stored(indexed("targets", micro)));
      r.outputs.push_back(put(indexed("dwte.head", micro), head.grads.at("wte.weight")));
    }
    add(std::move(r));
  }
  for (int layer = end - 1; layer >= context_.first_layer; --layer) {
    OpRecord r{"block.bwd", static_cast<uint32_t>(layer), m, {}, {}};
    const auto names = block_weights(layer);
    for (const auto& name : names) r.inputs.push_back(latest(name));
    r.inputs.push_back(latest(hidden(micro, layer)));
    r.inputs.push_back(latest(dhidden(micro, layer + 1)));
    for (const auto& name : names) r.inputs.push_back(latest(grad_name(name)));
    r.outputs.push_back(put(dhidden(micro, layer), boundary(layer)));
    for (const auto& name : names) r.outputs.push_back(put(grad_name(name), grads.at(name)));
    add(std::move(r));
  }
  if (context_.is_first()) {
    OpRecord r{"embed.bwd", 0, m, {}, {}};
    r.inputs.push_back(latest(indexed("tokens", micro)));
    r.inputs.push_back(latest(dhidden(micro, 0)));
    r.inputs.push_back(latest(grad_name("wte.weight")));
    r.inputs.push_back(latest(grad_name("wpe.weight")));
    if (context_.is_last()) r.inputs.push_back(latest(indexed("dwte.head", micro)));
    r.outputs.push_back(put(grad_name("wte.weight"), grads.at("wte.weight")));
    r.outputs.push_back(put(grad_name("wpe.weight"), grads.at("wpe.weight")));
    add(std::move(r));
  }
  micros_.erase(micro);
}

void StepTracer::on_send(bool activation, int micro, const torch::Tensor&) {
  if (!began_) return;
  const int end = context_.first_layer + context_.layer_count;
  const std::string what = activation ? hidden(micro, end) : dhidden(micro, context_.first_layer);
  add({"send", 0, static_cast<uint32_t>(micro), {latest(what)}, {}});
  message_records_[{activation ? "act" : "grad", micro}] = trace_.records.size() - 1;
}

void StepTracer::on_reduced() {
  if (!began_) return;
  if (context_.job.parallel.replicas <= 1) return;
  OpRecord r{"reduce", 0, 0, {}, {}};
  for (const auto& [name, p] : parameters_) r.inputs.push_back(latest(grad_name(name)));
  for (const auto& [name, p] : parameters_) r.outputs.push_back(put(grad_name(name), p.grad()));
  add(std::move(r));
  reduce_index_ = trace_.records.size() - 1;
}

void StepTracer::on_tied() {
  if (!began_) return;
  if (context_.job.parallel.stages <= 1 || !(context_.is_first() || context_.is_last())) return;
  for (const auto& [name, p] : parameters_) {
    if (name != "wte.weight") continue;
    add({"tied", 0, 0, {latest(grad_name(name))}, {put(grad_name(name), p.grad())}});
    tied_index_ = trace_.records.size() - 1;
  }
}

void StepTracer::on_update(const TrainingState& after, const Hash256& state_hash) {
  if (!began_) return;
  std::map<std::string, torch::Tensor> optimizer(after.optimizer.begin(), after.optimizer.end());
  for (const auto& [name, p] : after.weights) {
    OpRecord r{"adam", 0, 0, {}, {}};
    for (const std::string& in : {name, grad_name(name), "adam.m." + name, "adam.v." + name, std::string("adam.step")})
      r.inputs.push_back(latest(in));
    r.outputs.push_back(put(name, p));
    r.outputs.push_back(put("adam.m." + name, optimizer.at("adam.m." + name)));
    r.outputs.push_back(put("adam.v." + name, optimizer.at("adam.v." + name)));
    add(std::move(r));
  }
  // A compressor's residual moves in the sum that used it.
  for (const auto& [name, t] : after.residuals) {
    const Hash256 h = tensor_hash(t);
    if (latest(name).hash == h) continue;
    const std::optional<size_t> at = name == "compress.tied_residual" ? tied_index_ : reduce_index_;
    if (at) trace_.records[*at].outputs.push_back(put(name, t));
  }
  OpRecord r{"hash_state", 0, 0, {}, {}};
  for (const auto* list : {&after.weights, &after.optimizer, &after.residuals})
    for (const auto& [name, t] : *list)
      if (name != "adam.step") r.inputs.push_back(latest(name));
  r.inputs.push_back(latest("adam.step"));
  r.outputs.push_back(put("state", digest_tensor(state_hash)));
  add(std::move(r));
  hash_state_index_ = trace_.records.size() - 1;
}

Result<Trace> StepTracer::finish(const Hash256& inbound, const Hash256& outbound, const Hash256& leaf,
                                 const Messages& messages) {
  if (!began_ || trace_.records.empty() || trace_.records[hash_state_index_].kind != "hash_state")
    return kind_error(ErrorKind::internal, "the traced step did not run to its state hash");
  // Messages: their digests are outputs of start (the evidence holds them)
  // and inputs of the op that consumed them; sent ones are outputs.
  auto consumer = [&](const net::Tag& tag) -> std::optional<size_t> {
    if (tag.kind == "act" || tag.kind == "grad") {
      auto it = message_records_.find({tag.kind, tag.micro});
      if (it != message_records_.end()) return it->second;
      return std::nullopt;
    }
    return tag.kind == "tied" ? tied_index_ : reduce_index_;
  };
  for (const auto& [tag, digest] : messages.received) {
    OpValue v = put(message_name("in", tag, tag.from), digest_tensor(digest));
    trace_.records[0].outputs.push_back(v);
    if (auto at = consumer(tag)) trace_.records[*at].inputs.push_back(v);
  }
  for (const auto& [to, tag, digest] : messages.sent) {
    OpValue v = put(message_name("out", tag, to), digest_tensor(digest));
    if (auto at = consumer(tag)) trace_.records[*at].outputs.push_back(v);
  }
  auto& seal = trace_.records[hash_state_index_];
  seal.outputs.push_back(put("inbound", digest_tensor(inbound)));
  seal.outputs.push_back(put("outbound", digest_tensor(outbound)));
  add({"commit", 0, 0, {latest("state"), latest("inbound"), latest("outbound")}, {put("leaf", digest_tensor(leaf))}});
  trace_.chain = {chain_start(trace_.leaf_prev)};
  for (const OpRecord& r : trace_.records) trace_.chain.push_back(chain_next(trace_.chain.back(), record_hash(r)));
  began_ = false;
  return std::move(trace_);
}

}  // namespace sn::train
