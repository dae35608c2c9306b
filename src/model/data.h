// Training data: a corpus, its SentencePiece tokens (trained and applied with
// the spm_train / spm_encode tools, cached), a tokenizer for decoding, and a
// dataset of fixed-length samples in a seeded order. docs/data.md.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/job.h"
#include "core/result.h"

namespace sn::model {

// The cache directory for DATA (its cache_dir, else $XDG_CACHE_HOME/solvernet,
// else ~/.cache/solvernet), created if needed.
Result<std::filesystem::path> cache_directory(const DataConfig& data);

// "fortunes" → the Debian fortunes text files joined into one cached file;
// anything else is a readable, non-empty text file.
Result<std::filesystem::path> resolve_corpus(const DataConfig& data);

struct TokenizedCorpus {
  std::filesystem::path spm_model;
  std::filesystem::path vocab_file;
  std::vector<int32_t> tokens;  // the whole corpus, lines separated by the end-of-line id
  int vocab_size = 0;
};

// Trains a SentencePiece BPE model of VOCAB_SIZE pieces on the corpus and
// encodes it, caching both by a hash of the corpus bytes, the size and the
// options; later calls (and other processes) reuse the cache.
Result<TokenizedCorpus> prepare_corpus(const DataConfig& data, int vocab_size);

// Decoding (and an approximate greedy encoding) over a trained vocabulary.
class Tokenizer {
 public:
  static Result<Tokenizer> load(const std::filesystem::path& vocab_file);
  std::string decode(const std::vector<int32_t>& ids) const;
  // Greedy longest-match over the pieces: not SentencePiece's exact BPE merge
  // order, so it may split words differently than spm_encode; decode(encode(s)) == s
  // for text whose characters are all in the vocabulary.
  std::vector<int32_t> encode(std::string_view text) const;
  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  static constexpr int32_t kEndOfLine = 2;  // SentencePiece's </s>, used as line break

 private:
  std::vector<std::string> pieces_;
  std::unordered_map<std::string, int32_t> index_;
  size_t longest_ = 1;
};

// Non-overlapping samples of seq_len + 1 tokens over the token stream; the last
// holdout_fraction of them are held out for evaluation.
class Dataset {
 public:
  Dataset(std::vector<int32_t> tokens, int64_t seq_len, double holdout_fraction);

  int64_t train_samples() const { return train_; }
  int64_t holdout_samples() const { return total_ - train_; }
  // The global batch of STEP: the next GLOBAL_BATCH ids of a sequence of
  // epochs, each a permutation of the training ids seeded by (SEED, epoch).
  std::vector<int64_t> samples_for_step(int64_t step, int64_t global_batch, uint64_t seed) const;
  // Inputs and targets (shifted by one) [B, seq_len], int64. HOLDOUT picks
  // from the held-out split (ids 0 .. holdout_samples() − 1).
  std::pair<torch::Tensor, torch::Tensor> batch(const std::vector<int64_t>& sample_ids, bool holdout = false) const;

 private:
  const std::vector<int64_t>& permutation(int64_t epoch, uint64_t seed) const;
  std::vector<int32_t> tokens_;
  int64_t seq_len_, total_, train_;
  mutable std::map<std::pair<int64_t, uint64_t>, std::vector<int64_t>> permutations_;
};

}  // namespace sn::model
