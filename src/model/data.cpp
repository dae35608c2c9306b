#include "model/data.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <random>
#include <sstream>

#include "core/fs.h"
#include "core/hash.h"
#include "core/process.h"

namespace sn::model {

namespace fs = std::filesystem;
namespace {
constexpr const char* kFortunesDir = "/usr/share/games/fortunes";
constexpr const char* kTokenizerVersion = "spm-bpe-v1";
}  // namespace

Result<fs::path> cache_directory(const DataConfig& data) {
  fs::path dir;
  if (!data.cache_dir.empty()) {
    dir = data.cache_dir;
  } else if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) {
    dir = fs::path(xdg) / "solvernet";
  } else if (const char* home = std::getenv("HOME"); home && *home) {
    dir = fs::path(home) / ".cache" / "solvernet";
  } else {
    dir = fs::temp_directory_path() / "solvernet-cache";
  }
  SN_TRY(ensure_directory(dir));
  return dir;
}

Result<fs::path> resolve_corpus(const DataConfig& data) {
  if (data.corpus != "fortunes") {
    std::error_code ec;
    if (!fs::is_regular_file(data.corpus, ec))
      return input_error("corpus {}: not a readable file", data.corpus);
    if (fs::file_size(data.corpus, ec) == 0) return input_error("corpus {}: file is empty", data.corpus);
    return fs::path(data.corpus);
  }
  std::error_code ec;
  if (!fs::is_directory(kFortunesDir, ec))
    return input_error("corpus \"fortunes\": {} is missing (install the Debian package 'fortunes')", kFortunesDir);
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(kFortunesDir, ec)) {
    const auto& p = entry.path();
    if (entry.is_symlink() || !entry.is_regular_file() || p.extension() == ".dat" || p.extension() == ".u8") continue;
    files.push_back(p);
  }
  std::sort(files.begin(), files.end());
  std::string text;
  for (const auto& f : files) {
    SN_ASSIGN(std::string body, read_file(f));
    std::istringstream lines(body);
    std::string line;
    while (std::getline(lines, line)) text += (line == "%" ? std::string() : line) + "\n";
  }
  if (text.empty()) return input_error("corpus \"fortunes\": no text found in {}", kFortunesDir);
  SN_ASSIGN(fs::path cache, cache_directory(data));
  fs::path out = cache / ("fortunes-" + to_hex(hash_string(text)).substr(0, 16) + ".txt");
  if (!fs::exists(out)) SN_TRY(write_file_atomic(out, text));
  return out;
}

static Result<std::vector<int32_t>> parse_ids(const std::string& text, int vocab_size) {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3);
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    const char* p = line.c_str();
    char* end = nullptr;
    while (*p) {
      long v = std::strtol(p, &end, 10);
      if (end == p) break;
      if (v < 0 || v >= vocab_size) return make_error("spm_encode produced id {} outside the vocabulary", v);
      ids.push_back(static_cast<int32_t>(v));
      p = end;
    }
    ids.push_back(Tokenizer::kEndOfLine);
  }
  return ids;
}

Result<TokenizedCorpus> prepare_corpus(const DataConfig& data, int vocab_size) {
  SN_ASSIGN(fs::path corpus, resolve_corpus(data));
  SN_ASSIGN(std::string text, read_file(corpus));
  SN_ASSIGN(fs::path cache, cache_directory(data));
  std::string key = to_hex(Hasher().update(text).update_u64(static_cast<uint64_t>(vocab_size)).update(kTokenizerVersion).finish()).substr(0, 24);
  TokenizedCorpus out;
  out.vocab_size = vocab_size;
  out.spm_model = cache / ("spm-" + key + ".model");
  out.vocab_file = cache / ("spm-" + key + ".vocab");
  fs::path ids_file = cache / ("spm-" + key + ".ids");

  if (!fs::exists(out.spm_model) || !fs::exists(out.vocab_file)) {
    // Train under a private prefix, then rename: a concurrent process either
    // sees no model or a whole one.
    fs::path prefix = cache / ("spm-" + key + ".tmp-" + std::to_string(::getpid()));
    auto trained = run_command({"spm_train", "--input=" + corpus.string(), "--model_prefix=" + prefix.string(),
                                "--vocab_size=" + std::to_string(vocab_size), "--model_type=bpe",
                                "--character_coverage=1.0", "--input_sentence_size=0",
                                "--shuffle_input_sentence=false", "--num_threads=1", "--minloglevel=1",
                                "--max_sentence_length=100000"});
    if (!trained.ok()) {
      fs::remove(prefix.string() + ".model");
      fs::remove(prefix.string() + ".vocab");
      if (trained.message().find("Vocabulary size") != std::string::npos)
        return input_error("corpus {} is too small for a vocabulary of {} pieces: lower model.vocab", corpus.string(), vocab_size);
      return make_error("spm_train failed on {}: {}", corpus.string(), trained.message());
    }
    fs::rename(prefix.string() + ".vocab", out.vocab_file);
    fs::rename(prefix.string() + ".model", out.spm_model);
  }
  std::string ids_bytes;
  if (auto cached = read_file(ids_file); cached.ok() && cached->size() % 4 == 0 && !cached->empty()) {
    out.tokens.resize(cached->size() / 4);
    std::memcpy(out.tokens.data(), cached->data(), cached->size());
  } else {
    SN_ASSIGN(std::string encoded, run_command({"spm_encode", "--model=" + out.spm_model.string(), "--output_format=id",
                                                "--input=" + corpus.string()}));
    SN_ASSIGN(out.tokens, parse_ids(encoded, vocab_size));
    std::string raw(out.tokens.size() * 4, '\0');
    std::memcpy(raw.data(), out.tokens.data(), raw.size());
    SN_TRY(write_file_atomic(ids_file, raw));
  }
  for (int32_t id : out.tokens)
    if (id < 0 || id >= vocab_size) return make_error("{}: cached token id {} outside the vocabulary", ids_file.string(), id);
  return out;
}

Result<Tokenizer> Tokenizer::load(const fs::path& vocab_file) {
  SN_ASSIGN(std::string text, read_file(vocab_file));
  Tokenizer t;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    auto tab = line.find('\t');
    std::string piece = tab == std::string::npos ? line : line.substr(0, tab);
    t.index_.emplace(piece, static_cast<int32_t>(t.pieces_.size()));
    t.longest_ = std::max(t.longest_, piece.size());
    t.pieces_.push_back(piece);
  }
  if (t.pieces_.size() < 3) return make_error("{}: not a SentencePiece vocabulary", vocab_file.string());
  return t;
}

static const std::string kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's word boundary

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  bool line_start = true;
  for (int32_t id : ids) {
    if (id < 0 || id >= static_cast<int32_t>(pieces_.size())) continue;
    if (id == kEndOfLine) {
      out += "\n";
      line_start = true;
      continue;
    }
    const std::string& piece = pieces_[static_cast<size_t>(id)];
    if (piece == "<unk>") { out += "?"; line_start = false; continue; }
    if (piece == "<s>" || piece == "</s>") continue;
    std::string text;
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, kSpace.size(), kSpace) == 0) {
        text += ' ';
        i += kSpace.size();
      } else {
        text += piece[i++];
      }
    }
    if (line_start && !text.empty() && text[0] == ' ') text.erase(0, 1);
    out += text;
    line_start = false;
  }
  return out;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  size_t line_begin = 0;
  while (line_begin <= text.size()) {
    size_t line_end = text.find('\n', line_begin);
    std::string_view line = text.substr(line_begin, line_end == std::string_view::npos ? std::string_view::npos : line_end - line_begin);
    std::string s = kSpace;
    for (char c : line) s += (c == ' ') ? kSpace : std::string(1, c);
    size_t i = line.empty() ? s.size() : 0;
    while (i < s.size()) {
      size_t take = std::min(longest_, s.size() - i);
      for (; take > 0; --take) {
        auto it = index_.find(s.substr(i, take));
        if (it != index_.end()) {
          ids.push_back(it->second);
          break;
        }
      }
      if (take == 0) {
        ids.push_back(0);  // <unk>
        take = 1;
      }
      i += take;
    }
    if (line_end == std::string_view::npos) break;
    ids.push_back(kEndOfLine);
    line_begin = line_end + 1;
  }
  return ids;
}

Dataset::Dataset(std::vector<int32_t> tokens, int64_t seq_len, double holdout_fraction)
    : tokens_(std::move(tokens)), seq_len_(seq_len) {
  total_ = tokens_.size() > 1 ? static_cast<int64_t>(tokens_.size() - 1) / seq_len_ : 0;
  int64_t holdout = static_cast<int64_t>(static_cast<double>(total_) * holdout_fraction);
  train_ = total_ - holdout;
}

const std::vector<int64_t>& Dataset::permutation(int64_t epoch, uint64_t seed) const {
  auto key = std::make_pair(epoch, seed);
  auto it = permutations_.find(key);
  if (it != permutations_.end()) return it->second;
  if (permutations_.size() > 4) permutations_.clear();
  std::vector<int64_t> order(static_cast<size_t>(train_));
  for (int64_t i = 0; i < train_; ++i) order[static_cast<size_t>(i)] = i;
  Hash256 h = Hasher().update("dataset-epoch").update_u64(seed).update_u64(static_cast<uint64_t>(epoch)).finish();
  uint64_t s = 0;
  for (int i = 0; i < 8; ++i) s |= static_cast<uint64_t>(h[static_cast<size_t>(i)]) << (8 * i);
  std::mt19937_64 rng(s);  // its output sequence is fixed by the standard
  for (int64_t i = train_ - 1; i > 0; --i) {
    // Unbiased bounded draw by rejection (std::uniform_int_distribution is implementation-defined).
    uint64_t bound = static_cast<uint64_t>(i + 1), limit = UINT64_MAX - UINT64_MAX % bound, r;
    do r = rng(); while (r >= limit);
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(r % bound)]);
  }
  return permutations_.emplace(key, std::move(order)).first->second;
}

std::vector<int64_t> Dataset::samples_for_step(int64_t step, int64_t global_batch, uint64_t seed) const {
  std::vector<int64_t> ids;
  if (train_ <= 0) return ids;
  for (int64_t k = 0; k < global_batch; ++k) {
    int64_t position = step * global_batch + k;
    ids.push_back(permutation(position / train_, seed)[static_cast<size_t>(position % train_)]);
  }
  return ids;
}

std::pair<torch::Tensor, torch::Tensor> Dataset::batch(const std::vector<int64_t>& sample_ids, bool holdout) const {
  const int64_t b = static_cast<int64_t>(sample_ids.size());
  torch::Tensor inputs = torch::empty({b, seq_len_}, torch::kInt64);
  torch::Tensor targets = torch::empty({b, seq_len_}, torch::kInt64);
  auto in = inputs.accessor<int64_t, 2>();
  auto out = targets.accessor<int64_t, 2>();
  for (int64_t row = 0; row < b; ++row) {
    int64_t sample = sample_ids[static_cast<size_t>(row)] + (holdout ? train_ : 0);
    TORCH_CHECK(sample >= 0 && sample < total_, "sample id out of range");
    const int32_t* window = tokens_.data() + sample * seq_len_;
    for (int64_t t = 0; t < seq_len_; ++t) {
      in[row][t] = window[t];
      out[row][t] = window[t + 1];
    }
  }
  return {inputs, targets};
}

}  // namespace sn::model
