#include "verify/step_trace.h"

#include "net/transport.h"
#include "train/evidence.h"
#include "train/replay.h"
#include "train/state.h"

namespace sn::verify {

namespace fs = std::filesystem;
namespace pb = solvernet::v1;

Result<int64_t> checkpoint_at_or_before(const fs::path& dir, int64_t step) {
  train::CheckpointStore store(dir, 1000000);
  int64_t best = -1;
  for (int64_t s : store.steps())
    if (s <= step) best = s;
  if (best < 0) return kind_error(ErrorKind::not_found, "{}: no checkpoint at or before step {}", dir.string(), step);
  return best;
}

Result<train::Trace> trace_member_step(const TraceInputs& inputs) {
  if (inputs.steps.empty()) return input_error("trace: no step to trace");
  train::ReplayInputs replay;
  replay.setup = inputs.setup;
  replay.checkpoint_dir = inputs.checkpoint_dir;
  replay.checkpoint_step = inputs.checkpoint_step;
  replay.cheat = inputs.cheat;
  SN_ASSIGN(auto session, train::ReplaySession::open(replay));
  for (size_t i = 0; i + 1 < inputs.steps.size(); ++i) SN_TRY(session->run_step(inputs.steps[i]));
  const pb::StepEvidence& last = inputs.steps.back();
  SN_ASSIGN(train::OpContext context, train::op_context_of(inputs.setup, last.step()));
  train::StepTracer tracer(context, inputs.leaf_prev);
  session->worker().set_tracer(&tracer);
  auto replayed = session->run_step(last);
  session->worker().set_tracer(nullptr);
  if (!replayed.ok()) return replayed.error();
  // The step's messages by tag: received as recorded (the sender's index in
  // the setup's member list), sent as the honest code sent them.
  train::StepTracer::Messages messages;
  for (const auto& message : last.inbound()) {
    net::Tag tag{message.kind(), message.step(), message.micro(), message.round(), message.chunk(), -1};
    for (int i = 0; i < inputs.setup.members_size(); ++i)
      if (inputs.setup.members(i).node_id() == message.from_node_id()) tag.from = i;
    messages.received.emplace_back(tag, net::tensor_message_digest(message));
  }
  for (const auto& sent : replayed->outbound) messages.sent.push_back({sent.to, sent.tag, sent.digest});
  return tracer.finish(replayed->inbound_digest, replayed->outbound_digest, replayed->leaf, messages);
}

pb::OpRecord record_to_proto(const train::OpRecord& record) {
  pb::OpRecord out;
  out.set_kind(record.kind);
  out.set_layer(record.layer);
  out.set_micro(record.micro);
  for (const auto& v : record.inputs) {
    auto* h = out.add_inputs();
    h->set_name(v.name);
    h->set_hash(v.hash.data(), v.hash.size());
  }
  for (const auto& v : record.outputs) {
    auto* h = out.add_outputs();
    h->set_name(v.name);
    h->set_hash(v.hash.data(), v.hash.size());
  }
  return out;
}

Result<train::OpRecord> record_from_proto(const pb::OpRecord& record) {
  train::OpRecord out;
  out.kind = record.kind();
  out.layer = record.layer();
  out.micro = record.micro();
  auto convert = [](const auto& list, std::vector<train::OpValue>& into) -> Status {
    for (const auto& v : list) {
      if (v.hash().size() != 32) return kind_error(ErrorKind::bad_peer, "operation value {} has a {}-byte hash", v.name(), v.hash().size());
      train::OpValue value;
      value.name = v.name();
      std::copy(v.hash().begin(), v.hash().end(), value.hash.begin());
      into.push_back(std::move(value));
    }
    return ok_status();
  };
  SN_TRY(convert(record.inputs(), out.inputs));
  SN_TRY(convert(record.outputs(), out.outputs));
  return out;
}

StepOps step_ops_of(const train::Trace& trace) {
  StepOps ops;
  for (const auto& record : trace.records) ops.records.push_back(record_to_proto(record));
  ops.chain = trace.chain;
  if (!trace.records.empty()) {
    for (const auto& input : trace.records.back().inputs) {
      if (input.name == "state") ops.state = input.hash;
      if (input.name == "inbound") ops.inbound = input.hash;
      if (input.name == "outbound") ops.outbound = input.hash;
    }
  }
  return ops;
}

}  // namespace sn::verify
