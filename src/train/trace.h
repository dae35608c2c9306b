// The operation trace of one training step of one member, and the referee's
// recomputation of one operation (docs/verification.md, "Operation trace"): the second
// bisection of a dispute, after the step bisection has found the one step
// whose leaf the parties disagree on.
//
// A trace lists the step's operations in execution order, each with named
// inputs and outputs by hash; a running Keccak chain over the records is what
// the solver posts on chain. Every input of an operation is the latest output
// of that name of an earlier operation (or of `start`), so a referee handed
// record j and the records before it can check the inputs against the agreed
// prefix, fetch the tensors by hash and rerun that one operation.
//
// The trace is taken through the StageWorker itself (the worker calls a
// StepTracer at each operation boundary, and the model calls it at each
// block), so it cannot drift from what training computes: a tracer changes no
// arithmetic, and with none attached training pays one branch per boundary.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/hash.h"
#include "core/job.h"
#include "core/result.h"
#include "model/gpt.h"
#include "net/transport.h"
#include "proto/solvernet.pb.h"
#include "train/adamw.h"

namespace sn::train {

struct TrainingState;

// H(str("solvernet/tensor/v1") ‖ str(dtype) ‖ u64(rank) ‖ u64(dim)… ‖
// u64(nbytes) ‖ bytes), dtype as safetensors names it ("F32", "I64", "U8").
Hash256 tensor_hash(const torch::Tensor& tensor);

// Values named state, inbound, outbound, leaf, leaf_prev, request and msg.*
// are 32-byte digests, not tensors: their "hash" is the digest itself. In a
// trace's tensor store and in recompute_op's inputs they are u8 [32] tensors.
bool is_digest_value(std::string_view name);
torch::Tensor digest_tensor(const Hash256& digest);
// The hash of value NAME holding T: the digest for digest values, else tensor_hash.
Hash256 value_hash(std::string_view name, const torch::Tensor& t);

struct OpValue {
  std::string name;
  Hash256 hash{};
  bool operator==(const OpValue&) const = default;
};

// One operation. KIND is one of start, batch, recv, embed.fwd, block.fwd,
// head.fwd, send, head.bwd, block.bwd, embed.bwd, reduce, tied, adam,
// hash_state, commit; LAYER and MICRO are 0 where they do not apply.
struct OpRecord {
  std::string kind;
  uint32_t layer = 0;
  uint32_t micro = 0;
  std::vector<OpValue> inputs, outputs;
};

// Keccak-256 over abi.encodePacked("solvernet/op/v1", keccak256(kind),
// uint32 layer, uint32 micro, uint32 n_in, (keccak256(name), hash)…, uint32
// n_out, (keccak256(name), hash)…): a contract can build the commit record.
Hash256 record_hash(const OpRecord& record);
// r_0 = K("solvernet/ops/v1" ‖ leaf_prev); r_j = K(r_{j−1} ‖ record_hash_j).
Hash256 chain_start(const Hash256& leaf_prev);
Hash256 chain_next(const Hash256& previous, const Hash256& record_hash);

struct Trace {
  int64_t step = 0;                           // t, 1-based: the step after leaf t−1
  Hash256 leaf_prev{};                        // leaf t−1
  std::vector<OpRecord> records;              // ops 1 … m
  std::vector<Hash256> chain;                 // r_0 … r_m
  std::map<Hash256, torch::Tensor> tensors;   // every input and output by hash
  const Hash256& root() const { return chain.back(); }
};

// Every input of record J (0-based into trace.records) is the latest output of
// that name among records 0 … J−1. Error (bad_peer) naming the input otherwise.
Status check_inputs_from_prefix(const Trace& trace, size_t j);
// The chain recomputed from leaf_prev and the records equals trace.chain.
Status check_chain(const Trace& trace);

// What recomputing an operation needs besides its inputs: the job, the
// member's slice of the model and the step.
struct OpContext {
  JobConfig job;
  int first_layer = 0, layer_count = 0;
  int64_t step = 0;  // t, 1-based
  bool is_first() const { return first_layer == 0; }
  bool is_last() const { return first_layer + layer_count == job.model.layers; }
};
// The context of the member a SetupJobRequest sets up, for step T.
Result<OpContext> op_context_of(const solvernet::v1::SetupJobRequest& setup, int64_t t);

// Kinds a referee recomputes alone (embed/block/head fwd and bwd, adam,
// commit); the others (start, batch, recv, send, reduce, tied, hash_state)
// need the step replayed up to them.
bool recomputable(std::string_view kind);

// Recomputes RECORD from INPUTS (by name; their hashes are not checked here:
// see check_inputs) and returns its outputs, names in the record's order.
// Errors: bad_peer when the record or its inputs are malformed (an input it
// needs is missing, a shape or dtype does not fit, an output it names is not
// the op's): whoever served them is at fault; unavailable for a kind that is
// not recomputable ("needs a step replay"). Pure: no state is kept; the same
// inputs give the same bits.
Result<std::vector<OpValue>> recompute_op(const OpContext& context, const OpRecord& record,
                                          const std::map<std::string, torch::Tensor>& inputs);
// Each of RECORD's inputs is in INPUTS with the hash the record names (bad_peer otherwise).
Status check_inputs(const OpRecord& record, const std::map<std::string, torch::Tensor>& inputs);
// The inputs of trace.records[J] from the trace's tensor store.
Result<std::map<std::string, torch::Tensor>> op_inputs(const Trace& trace, size_t j);

// Records a step as the worker runs it. The worker calls these hooks (see
// StageWorker::set_tracer) and the model calls on_forward; then finish()
// seals the trace with the digests only the step's end knows. One step per
// tracer; hooks outside begin() … finish() (an evaluation round) do nothing.
// Not thread-safe (a worker's step runs on one thread).
class StepTracer : public model::ForwardObserver {
 public:
  StepTracer(OpContext context, const Hash256& leaf_prev);

  // ---- called by StageWorker::run_step (training steps only) ----
  // Before the first micro-batch: the state the step starts from and the
  // live parameters (their gradients are defined and zero).
  void begin(const solvernet::v1::RunStepRequest& request, const TrainingState& state,
             const NamedTensors& parameters);
  // Micro-batch MICRO's input: tokens (first stage) or the decoded activations.
  void on_input(int micro, const torch::Tensor& input);
  // The last stage's loss of MICRO (before scaling).
  void on_loss(int micro, const torch::Tensor& loss);
  // The decoded gradient of this stage's output for MICRO (not the last stage).
  void on_output_gradient(int micro, const torch::Tensor& gradient);
  // After MICRO's backward: the gradients accumulated so far.
  void on_backward(int micro);
  // TENSOR was sent on (activations to the next stage, or the input's gradient back).
  void on_send(bool activation, int micro, const torch::Tensor& tensor);
  // After the replicas' gradient sum, and after the tied embedding's.
  void on_reduced();
  void on_tied();
  // After AdamW: the state after the step and its hash.
  void on_update(const TrainingState& after, const Hash256& state_hash);

  void on_forward(Part part, int layer, const torch::Tensor& in, const torch::Tensor& out) override;

  // Seals the trace: hash_state's outputs gain INBOUND and OUTBOUND, the
  // commit record (output LEAF) is added, messages of the step (tag name →
  // digest) fill in the recv/send/reduce/tied records and start's outputs,
  // and the chain is built. The tracer is spent afterwards.
  struct Sent {
    int to = 0;  // member index
    net::Tag tag;
    Hash256 digest{};
  };
  struct Messages {
    std::vector<std::pair<net::Tag, Hash256>> received;  // net::tensor_message_digest as received
    std::vector<Sent> sent;                              // as sent (signed)
  };
  Result<Trace> finish(const Hash256& inbound, const Hash256& outbound, const Hash256& leaf,
                       const Messages& messages = {});

 private:
  OpValue put(const std::string& name, const torch::Tensor& value);  // stores a clone, updates latest_
  OpValue latest(const std::string& name) const;
  torch::Tensor stored(const std::string& name) const;  // the latest value of NAME
  void add(OpRecord record);
  std::vector<std::string> block_weights(int layer) const;

  OpContext context_;
  Trace trace_;
  NamedTensors parameters_;
  std::map<std::string, Hash256> latest_;
  // Per micro-batch: the logits (until its loss arrives) and the gradients
  // of block boundaries captured by hooks (by layer index).
  struct Micro {
    torch::Tensor logits;
    std::map<int, torch::Tensor> boundary_gradients;
  };
  std::map<int, Micro> micros_;
  int current_micro_ = 0;
  solvernet::v1::RunStepRequest request_;
  // Records that consumed or produced messages: recv/send by (kind, micro), the sums.
  std::map<std::pair<std::string, int>, size_t> message_records_;
  std::optional<size_t> reduce_index_, tied_index_;
  size_t hash_state_index_ = 0;
  bool began_ = false;
};

}  // namespace sn::train
