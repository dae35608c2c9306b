// Training data: a corpus, its SentencePiece tokens (trained and applied with
// the spm_train / spm_encode tools, cached), a tokenizer for decoding, and a
// dataset of fixed-length samples in a seeded order. docs/data.md.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/job.h"
#include "core/result.h"

namespace sn::model {

// The cache directory for DATA (its cache_dir, else $XDG_CACHE_HOME/solvernet,
// else ~/.cache/solvernet), created if needed.
Result<std::filesystem::path> cache_directory(const DataConfig& data);

// "fortunes" → the Debian fortunes text files (/usr/share/games/fortunes,
// plain-text files only, sorted by name, "%" separator lines made blank)
// joined once into a cached file; anything else is a readable, non-empty text
// file. The first form caches under DATA's cache directory, the second under
// the default one.
Result<std::filesystem::path> resolve_corpus(const DataConfig& data);
Result<std::filesystem::path> resolve_corpus(const std::string& corpus);

// The longest corpus line, in bytes (spm_train's --max_sentence_length: it would
// silently skip a longer line).
inline constexpr size_t kMaxCorpusLineBytes = 100'000;
// The largest share of <unk> tokens prepare_corpus accepts (only a tokenizer trained
// on another corpus produces any).
inline constexpr double kMaxUnknownFraction = 0.25;

// Checks TEXT as a corpus before tokenizer training (docs/data.md): UTF-8 without NUL
// bytes, no line over kMaxCorpusLineBytes, some text, and (VOCAB_SIZE > 0) few
// enough distinct characters for VOCAB_SIZE pieces: characters + 4 ≤ vocab. Input
// errors name WHAT (e.g. "data.corpus corpus.txt"), the line and the job field to change.
Status check_corpus_text(std::string_view text, const std::string& what, int vocab_size);

// Resolves DATA's corpus (and tokenizer corpus) and checks them as prepare_corpus
// will, without training anything: for the client to refuse a bad corpus before
// any node starts.
Status check_corpus(const DataConfig& data, int vocab_size);

struct TokenizedCorpus {
  std::filesystem::path spm_model;
  std::filesystem::path vocab_file;
  std::vector<int32_t> tokens;  // the whole corpus, lines separated by the end-of-line id
  int vocab_size = 0;
};

// Trains a SentencePiece BPE model of VOCAB_SIZE pieces on the corpus
// (spm_train, one thread, no sampling or shuffling, identity normalisation so
// spaces and tabs survive) and encodes it (spm_encode), caching model,
// vocabulary and ids under the cache directory keyed by a hash of the corpus
// bytes, the size and the options. Later calls, and other processes, reuse the
// cache; every cache file is written whole under a private name and renamed,
// so concurrent preparers never see a torn file. The texts are checked first
// (check_corpus_text); a vocabulary too large for the text is an input error
// naming the largest size that fits, and any other spm_train failure is one
// line naming model.vocab, never the tool's log.
Result<TokenizedCorpus> prepare_corpus(const DataConfig& data, int vocab_size);

// Decoding and encoding over a trained SentencePiece BPE vocabulary, in
// process (libsentencepiece is not linked: it carries its own protobuf).
// Lines map to runs of pieces separated by kEndOfLine, as prepare_corpus
// produces them.
class Tokenizer {
 public:
  // Reads the ".vocab" text file (piece TAB score per line) or the ".model"
  // protobuf written by spm_train (chosen by the file's extension).
  static Result<Tokenizer> load(const std::filesystem::path& vocab_or_model);
  // The ".vocab" text itself (as a model file carries it); WHAT names it in errors.
  static Result<Tokenizer> parse_vocab(std::string_view text, std::string_view what);
  // Unknown ids are skipped, <unk> decodes as "?", <s> as nothing.
  std::string decode(const std::vector<int32_t>& ids) const;
  // SentencePiece's BPE as llama.cpp does it: start from UTF-8 characters,
  // repeatedly merge the adjacent pair whose concatenation is the
  // highest-scoring piece (leftmost on ties). For a BPE model trained as
  // prepare_corpus does this gives spm_encode's ids. Limits: no Unicode
  // normalisation, and a character not in the vocabulary becomes <unk> (no
  // byte fallback), so decode(encode(s)) == s only for text whose
  // characters all occur in the training corpus.
  std::vector<int32_t> encode(std::string_view text) const;
  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  // The longest mergeable piece, in bytes (at least 4, a UTF-8 character as
  // <unk>): no token covers more text than this, so a text of N bytes has at
  // least N / max_piece_bytes() tokens.
  size_t max_piece_bytes() const { return std::max<size_t>(max_piece_bytes_, 4); }
  const std::string& piece(int32_t id) const { return pieces_.at(static_cast<size_t>(id)); }
  static constexpr int32_t kUnknown = 0;    // SentencePiece's <unk>
  static constexpr int32_t kEndOfLine = 2;  // SentencePiece's </s>, used as line break

 private:
  void add_piece(std::string piece, float score);
  void encode_line(std::string_view line, std::vector<int32_t>* ids) const;

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> index_;  // mergeable pieces only (no control pieces)
  size_t max_piece_bytes_ = 0;
};

// Non-overlapping samples of seq_len + 1 tokens over the token stream (sample
// i is tokens [i·(seq_len+1), (i+1)·(seq_len+1))); the last holdout_fraction
// of them are held out for evaluation, so no token of a held-out sample is
// ever trained on. All methods are safe to call from several threads.
class Dataset {
 public:
  Dataset(std::vector<int32_t> tokens, int64_t seq_len, double holdout_fraction);

  int64_t train_samples() const { return train_; }
  int64_t holdout_samples() const { return total_ - train_; }
  // The global batch of STEP. The training ids are split into SHARDS shards
  // (one per data-parallel replica): shard r holds the ids ≡ r (mod SHARDS),
  // so a sample always lands on the same replica — which AQ-SGD's per-sample
  // buffers need to ever find it again. Each epoch is a seeded permutation of
  // every shard; an epoch has steps_per_epoch() steps, each taking the next
  // GLOBAL_BATCH / SHARDS ids of every shard (shard 0's first), and the few ids
  // left at the end of a permutation sit that epoch out, so no step ever holds
  // a sample twice. Empty if SHARDS does not divide GLOBAL_BATCH or a shard is
  // smaller than its share of a batch.
  std::vector<int64_t> samples_for_step(int64_t step, int64_t global_batch, uint64_t seed,
                                        int64_t shards = 1) const;
  int64_t steps_per_epoch(int64_t global_batch, int64_t shards = 1) const;
  // Training ids in shard SHARD of SHARDS.
  int64_t shard_size(int64_t shard, int64_t shards) const;
  // The permutation of a shard's training ids for (EPOCH, SEED): Fisher-Yates
  // over std::mt19937_64 seeded from BLAKE2b(seed, epoch[, shard, shards]),
  // the same on every platform.
  std::vector<int64_t> epoch_order(int64_t epoch, uint64_t seed, int64_t shard = 0, int64_t shards = 1) const;
  // Inputs and targets (shifted by one) [B, seq_len], int64. HOLDOUT picks
  // from the held-out split (ids 0 .. holdout_samples() − 1). An id out of
  // range throws (c10::Error): callers pass ids from samples_for_step.
  std::pair<torch::Tensor, torch::Tensor> batch(const std::vector<int64_t>& sample_ids, bool holdout = false) const;

 private:
  std::vector<int32_t> tokens_;
  int64_t seq_len_, total_, train_;
  // Recently used permutations (a step needs one or two epochs').
  std::shared_ptr<std::mutex> cache_mutex_ = std::make_shared<std::mutex>();
  mutable std::map<std::tuple<int64_t, uint64_t, int64_t, int64_t>, std::shared_ptr<const std::vector<int64_t>>>
      permutations_;
  std::shared_ptr<const std::vector<int64_t>> cached_order(int64_t epoch, uint64_t seed, int64_t shard,
                                                           int64_t shards) const;
};

}  // namespace sn::model
