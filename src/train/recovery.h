// Private to sn_train: what the client keeps to survive a member's death
// (docs/resilience.md): the job dir (job file, state.json and a
// mirror of every member's newest checkpoints) and the moves of a recovery.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/job.h"
#include "core/result.h"
#include "net/transport.h"
#include "proto/solvernet.pb.h"
#include "train/state.h"
#include "train/train.h"

namespace sn::train {

// JOB_DIR/<layout>/stage<s>-replica<r>/ holds each role's checkpoint files
// exactly as its node wrote them (docs/checkpoints.md), so CheckpointStore
// checks a mirrored checkpoint the same way a node checks its own. The layout
// ("checkpoints", then "checkpoints-1", "checkpoints-2", … after each change
// of the replica count) is the one state.json names: a new layout is built
// beside the old one and state.json's atomic write switches to it, so a
// client killed at any moment leaves state.json naming a whole layout.
class CheckpointMirror {
 public:
  static constexpr const char* kFirstLayout = "checkpoints";
  // Whether NAME is a layout's directory name (checkpoints, checkpoints-<n>).
  static bool is_layout_name(const std::string& name);

  CheckpointMirror(std::filesystem::path job_dir, int64_t stages, int64_t replicas,
                   std::string layout = kFirstLayout);

  const std::string& layout() const { return layout_; }
  int64_t replicas() const { return replicas_; }
  std::filesystem::path role_dir(int64_t stage, int64_t replica) const;
  // Writes FILES (the manifest last) as ROLE's checkpoint of STEP, then loads
  // it whole to check sizes and BLAKE2b against the manifest. On failure the
  // manifest is removed: that step is not complete for the role.
  Status store(int64_t stage, int64_t replica, int64_t step, const std::vector<solvernet::v1::CheckpointBlob>& files);
  // The newest step complete for every role (0: none).
  int64_t newest_common_step() const;
  // ROLE's checkpoint of STEP, checked, as the files PutCheckpoint carries
  // (manifest last), and its manifest (the state digest the spare must reproduce).
  Result<std::vector<solvernet::v1::CheckpointBlob>> files(int64_t stage, int64_t replica, int64_t step) const;
  Result<CheckpointManifest> manifest(int64_t stage, int64_t replica, int64_t step) const;
  // Deletes every role's checkpoints older than STEP (best effort).
  void prune_before(int64_t step) const;
  // Deletes every role's checkpoints but STEP's, and every other layout: at
  // --resume, what a killed client left that state.json does not name (older
  // checkpoints it had not pruned yet, newer ones it had not recorded yet, a
  // layout it was building or had not deleted yet).
  void prune_all_but(int64_t step) const;
  // A re-plan on fewer replicas: the roles of replicas KEPT (ascending) become
  // replicas 0, 1, … in that order; the others' are left out.
  Status renumber_replicas(const std::vector<int64_t>& kept);
  // Growing back to REPLICAS: each new role starts as a copy of replica 0's
  // checkpoints (its new members restore from them).
  Status add_replicas(int64_t replicas);
  // After renumber_replicas or add_replicas the mirror stores into the new
  // layout; the old one is kept until state.json names the new one, then
  // deleted by this (a no-op when there is none).
  void remove_retired_layout();

 private:
  // Builds the next layout, replica r of each stage holding (hard links to)
  // the files of replica SOURCE[r] of the current one, and moves to it.
  Status relayout(const std::vector<int64_t>& source);
  void prune_if(const std::function<bool(int64_t)>& gone) const;

  std::filesystem::path job_dir_;
  std::string layout_;
  std::filesystem::path dir_;      // job_dir_ / layout_
  std::filesystem::path retired_;  // the layout before the last relayout ("": none)
  int64_t stages_, replicas_;
};

// JOB_DIR/job.toml (the job as sent to the nodes) and JOB_DIR/state.json.
Status write_job_file(const std::filesystem::path& job_dir, const JobConfig& job);
Status write_job_state(const std::filesystem::path& job_dir, const JobDirState& state);

// Replicas of one stage that should hold bitwise equal state but report
// different HASHES (one per replica, NAMES alike). Who lied cannot be told
// from hashes alone unless most replicas agree: then the others are blamed;
// with no strict majority (two replicas, or a split) every replica is named
// and none is blamed. WHEN ends the message ("after step 30"). nullopt when
// all agree.
struct ReplicaDisagreement {
  std::string message;
  std::vector<size_t> blamed;  // indices into NAMES / HASHES
  // What ends the job: bad_peer when someone is blamed, else aborted (no
  // node can be shown at fault, so none is reported as one).
  Error error() const { return kind_error(blamed.empty() ? ErrorKind::aborted : ErrorKind::bad_peer, "{}", message); }
};
std::optional<ReplicaDisagreement> replica_disagreement(const std::vector<std::string>& names,
                                                        const std::vector<std::string>& hashes, int64_t stage,
                                                        const std::string& when);

}  // namespace sn::train
