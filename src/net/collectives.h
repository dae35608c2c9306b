// Collectives written only against net::Transport (like Gloo's AllreduceRing):
// they never know whether a link is emulated, or how messages travel.
//
// Failure contract, for every class here: run() returns the first error (a
// peer's timeout, a malformed message, an abort) and, before returning it,
// aborts the transport with that error's message. The job cannot go on
// without a new SetupJob: peers waiting on this member fail at their own
// timeout or when the client ends the job. What the output holds after an
// error is unspecified (a buffer may be partly reduced).
#pragma once

#include <chrono>
#include <span>
#include <string>
#include <vector>

#include "core/result.h"
#include "net/transport.h"

namespace sn::net {

struct CollectiveOptions {
  int64_t chunk_bytes = 1 << 20;            // largest message payload of a ring all-reduce
  std::chrono::milliseconds timeout{60000}; // per receive
  std::string kind = "allreduce";           // message kind, to keep separate collectives apart
  // On a failure (a peer's timeout, a failed send) abort the transport, so
  // every other wait of the job fails at once. False: leave it usable, for a
  // caller that retries among fewer members (the DiLoCo outer step).
  bool abort_on_error = true;
};

// Ring all-reduce (reduce-scatter, then all-gather) of one flat f32 buffer, in
// chunks of at most chunk_bytes. Every element is summed in ring order, so
// every member ends with bitwise the same sum, run after run.
class RingAllreduce {
 public:
  // RING: member indices in ring order; this member must be in it.
  RingAllreduce(Transport& transport, std::vector<int> ring, CollectiveOptions options);
  // Sums BUFFER in place across the ring. STEP tags the messages.
  Status run(std::span<float> buffer, int64_t step);
  // How many messages one member receives from its predecessor for a buffer
  // of VALUES floats (for sizing inboxes).
  static int64_t messages_per_member(int64_t values, int ring_size, int64_t chunk_bytes);

 private:
  Transport& transport_;
  std::vector<int> ring_;
  CollectiveOptions options_;
};

// Ring all-gather of one message per member: each hop forwards what it
// received the round before. Payloads are opaque here (dense or compressed).
class RingAllgather {
 public:
  RingAllgather(Transport& transport, std::vector<int> ring, CollectiveOptions options);
  // Contributes OWN (its payload; tag fields are set here) and returns every
  // member's message, indexed by ring position (OWN at this member's).
  Result<std::vector<solvernet::v1::TensorMessage>> run(solvernet::v1::TensorMessage own, int64_t step);

 private:
  Transport& transport_;
  std::vector<int> ring_;
  CollectiveOptions options_;
};

// One swap with one peer: sends OWN, returns PEER's message of the same step.
class PairExchange {
 public:
  PairExchange(Transport& transport, int peer, CollectiveOptions options);
  Result<solvernet::v1::TensorMessage> run(solvernet::v1::TensorMessage own, int64_t step);

 private:
  Transport& transport_;
  int peer_;
  CollectiveOptions options_;
};

// A dense f32 vector as a message payload, and back (checked against the
// expected count; the error names the sender).
solvernet::v1::TensorMessage f32_message(std::span<const float> values);
Status read_f32(const solvernet::v1::TensorMessage& message, std::span<float> out, const std::string& sender);

}  // namespace sn::net
