#include "model/data.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
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
// Part of the cache key: change it whenever the spm_train flags change.
constexpr const char* kTokenizerVersion = "spm-bpe-identity-tab-v3";
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
    if (!fs::is_regular_file(data.corpus, ec) || ::access(data.corpus.c_str(), R_OK) != 0)
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

Result<fs::path> resolve_corpus(const std::string& corpus) {
  DataConfig data;
  data.corpus = corpus;
  return resolve_corpus(data);
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

Status check_corpus_text(std::string_view text, const std::string& what, int vocab_size) {
  std::vector<bool> seen(0x110000, false);  // by code point: a corpus has millions of characters
  seen[0x2581] = true;                       // SentencePiece's word boundary starts every line
  size_t characters = 1;
  int64_t line = 1;
  size_t line_start = 0;
  bool any_text = false;
  for (size_t i = 0; i < text.size();) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte == '\n') {
      if (i - line_start > kMaxCorpusLineBytes)
        return input_error("{}: line {} is {} bytes long, more than the {}-byte limit of a line; split the text "
                           "into lines", what, line, i - line_start, kMaxCorpusLineBytes);
      ++line;
      line_start = ++i;
      continue;
    }
    if (byte == 0) return input_error("{}: line {} holds a NUL byte: not a text file", what, line);
    // Strict UTF-8: spm_train and the tokenizer work on characters.
    size_t length = byte < 0x80 ? 1 : (byte >> 5) == 0x6 ? 2 : (byte >> 4) == 0xe ? 3 : (byte >> 3) == 0x1e ? 4 : 0;
    uint32_t code = length == 1 ? byte : length == 2 ? byte & 0x1f : length == 3 ? byte & 0x0f : byte & 0x07;
    bool valid = length > 0 && i + length <= text.size();
    for (size_t k = 1; valid && k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      valid = (next >> 6) == 0x2;
      code = (code << 6) | (next & 0x3f);
    }
    if (!valid || (length == 2 && code < 0x80) || (length == 3 && code < 0x800) || (length == 4 && code < 0x10000) ||
        code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff))
      return input_error("{}: line {} is not UTF-8 text (byte 0x{:02x} at column {})", what, line, byte,
                         i - line_start + 1);
    if (code != '\t' && code != '\r') {
      any_text |= code != ' ';
      const uint32_t piece = code == ' ' ? 0x2581 : code;
      if (!seen[piece]) {
        seen[piece] = true;
        ++characters;
      }
    }
    i += length;
  }
  if (text.size() - line_start > kMaxCorpusLineBytes)
    return input_error("{}: line {} is {} bytes long, more than the {}-byte limit of a line; split the text into lines",
                       what, line, text.size() - line_start, kMaxCorpusLineBytes);
  if (!any_text) return input_error("{}: holds no text, only blank lines", what);
  // spm_train needs a piece per character besides <unk>, <s>, </s> and the tab symbol.
  if (vocab_size > 0 && static_cast<int64_t>(characters) + 4 > vocab_size)
    return input_error("{}: has {} distinct characters, so model.vocab must be at least {} (a piece per character, "
                       "the word boundary and 4 reserved), got {}", what, characters - 1, characters + 4, vocab_size);
  return ok_status();
}

Status check_corpus(const DataConfig& data, int vocab_size) {
  SN_ASSIGN(fs::path corpus, resolve_corpus(data));
  SN_ASSIGN(std::string text, read_file(corpus));
  if (data.tokenizer_corpus.empty())
    return check_corpus_text(text, "data.corpus " + corpus.string(), vocab_size);
  SN_TRY(check_corpus_text(text, "data.corpus " + corpus.string(), 0));
  DataConfig tokenizer_data = data;
  tokenizer_data.corpus = data.tokenizer_corpus;
  SN_ASSIGN(fs::path tokenizer_corpus, resolve_corpus(tokenizer_data));
  SN_ASSIGN(std::string tokenizer_text, read_file(tokenizer_corpus));
  return check_corpus_text(tokenizer_text, "data.tokenizer_corpus " + tokenizer_corpus.string(), vocab_size);
}

Result<TokenizedCorpus> prepare_corpus(const DataConfig& data, int vocab_size) {
  // SentencePiece reserves ids 0..2 for <unk>, <s>, </s>.
  if (vocab_size < 4) return input_error("model.vocab must be at least 4, got {}", vocab_size);
  SN_ASSIGN(fs::path corpus, resolve_corpus(data));
  SN_ASSIGN(std::string text, read_file(corpus));
  fs::path tokenizer_corpus = corpus;
  std::string tokenizer_text = text;
  if (!data.tokenizer_corpus.empty()) {
    DataConfig tokenizer_data = data;
    tokenizer_data.corpus = data.tokenizer_corpus;
    SN_ASSIGN(tokenizer_corpus, resolve_corpus(tokenizer_data));
    SN_ASSIGN(tokenizer_text, read_file(tokenizer_corpus));
  }
  // Checked before any tool runs: spm_train's own failures are multi-line logs naming
  // its flags, not the job's fields.
  const bool own_tokenizer_corpus = !data.tokenizer_corpus.empty();
  SN_TRY(check_corpus_text(tokenizer_text,
                           fmt::format("{} {}", own_tokenizer_corpus ? "data.tokenizer_corpus" : "data.corpus",
                                       tokenizer_corpus.string()), vocab_size));
  if (own_tokenizer_corpus) SN_TRY(check_corpus_text(text, "data.corpus " + corpus.string(), 0));
  SN_ASSIGN(fs::path cache, cache_directory(data));
  std::string key = to_hex(Hasher().update(tokenizer_text).update_u64(static_cast<uint64_t>(vocab_size)).update(kTokenizerVersion).finish()).substr(0, 24);
  // The ids depend on the tokenizer and on the text it encodes.
  std::string ids_key = tokenizer_corpus == corpus ? key : to_hex(Hasher().update(key).update(text).finish()).substr(0, 24);
  TokenizedCorpus out;
  out.vocab_size = vocab_size;
  out.spm_model = cache / ("spm-" + key + ".model");
  out.vocab_file = cache / ("spm-" + key + ".vocab");
  fs::path ids_file = cache / ("spm-" + ids_key + ".ids");

  if (!fs::exists(out.spm_model) || !fs::exists(out.vocab_file)) {
    // Train under a private prefix, then rename: a concurrent process either
    // sees no model or a whole one.
    fs::path prefix = cache / ("spm-" + key + ".tmp-" + std::to_string(::getpid()));
    auto trained = run_command({"spm_train", "--input=" + tokenizer_corpus.string(), "--model_prefix=" + prefix.string(),
                                "--vocab_size=" + std::to_string(vocab_size), "--model_type=bpe",
                                "--character_coverage=1.0", "--input_sentence_size=0",
                                "--shuffle_input_sentence=false", "--num_threads=1", "--minloglevel=1",
                                "--max_sentence_length=100000", "--normalization_rule_name=identity",
                                "--remove_extra_whitespaces=false",
                                // spm_train never learns a tab on its own; as a symbol it round-trips.
                                "--user_defined_symbols=\t"});
    if (!trained.ok()) {
      std::error_code ignored;
      fs::remove(prefix.string() + ".model", ignored);
      fs::remove(prefix.string() + ".vocab", ignored);
      if (trained.error().kind == ErrorKind::aborted) return trained.error();  // Ctrl-C: nothing half-written stays
      // spm_train says "Vocabulary size too high (N). Please set it to a value <= M."
      const std::string& log = trained.message();
      if (auto at = log.find("Vocabulary size too high"); at != std::string::npos) {
        auto bound = log.find("<= ", at);
        std::string most = bound == std::string::npos ? std::string("?")
                                                      : std::to_string(std::strtol(log.c_str() + bound + 3, nullptr, 10));
        return input_error("corpus {} is too small for a vocabulary of {} pieces (at most {}): lower model.vocab",
                           tokenizer_corpus.string(), vocab_size, most);
      }
      // Its log names spm_train's flags, which a user cannot set: say what they can change.
      return input_error("cannot train a tokenizer of model.vocab = {} pieces on {} (spm_train failed); try another "
                         "model.vocab or a larger corpus", vocab_size, tokenizer_corpus.string());
    }
    // Training is deterministic, so a concurrent preparer renames identical
    // files over these; the model goes last because its presence marks the pair complete.
    std::error_code ec;
    fs::rename(prefix.string() + ".vocab", out.vocab_file, ec);
    if (!ec) fs::rename(prefix.string() + ".model", out.spm_model, ec);
    if (ec) return make_error("{}: cannot store the trained tokenizer: {}", cache.string(), ec.message());
  }
  if (auto cached = read_file(ids_file); cached.ok() && cached->size() % 4 == 0 && !cached->empty()) {
    out.tokens.resize(cached->size() / 4);
    std::memcpy(out.tokens.data(), cached->data(), cached->size());
  } else {
    // Ids go to a file of their own: the captured output also holds the tool's log lines.
    fs::path encoded_file = cache / ("spm-" + ids_key + ".txt.tmp-" + std::to_string(::getpid()));
    auto encoding = run_command({"spm_encode", "--model=" + out.spm_model.string(), "--output_format=id",
                                 "--input=" + corpus.string(), "--output=" + encoded_file.string()});
    auto encoded = encoding.ok() ? read_file(encoded_file) : Result<std::string>(encoding.error());
    std::error_code ignored;
    fs::remove(encoded_file, ignored);
    if (!encoding.ok() && encoding.error().kind == ErrorKind::aborted) return encoding.error();
    if (!encoded.ok()) {
      const std::string& log = encoded.message();
      return make_error("spm_encode failed on {}: {}", corpus.string(), log.substr(0, log.find('\n')));
    }
    SN_ASSIGN(out.tokens, parse_ids(*encoded, vocab_size));
    std::string raw(out.tokens.size() * 4, '\0');
    std::memcpy(raw.data(), out.tokens.data(), raw.size());
    SN_TRY(write_file_atomic(ids_file, raw));
  }
  int64_t unknown = 0;
  for (int32_t id : out.tokens) {
    if (id < 0 || id >= vocab_size) return make_error("{}: cached token id {} outside the vocabulary", ids_file.string(), id);
    unknown += id == Tokenizer::kUnknown;
  }
  // A tokenizer trained on other text maps characters it never saw to <unk>; past a
  // quarter of the tokens the model would learn mostly <unk>, silently.
  if (static_cast<double>(unknown) > kMaxUnknownFraction * static_cast<double>(out.tokens.size()))
    return input_error("data.corpus {}: {:.0f}% of its tokens are <unk> under the tokenizer of "
                       "data.tokenizer_corpus {} (characters it never saw); the limit is {:.0f}%",
                       corpus.string(), 100.0 * static_cast<double>(unknown) / static_cast<double>(out.tokens.size()),
                       tokenizer_corpus.string(), 100 * kMaxUnknownFraction);
  return out;
}

namespace {

const std::string kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's word boundary

bool is_control_piece(const std::string& piece) { return piece == "<unk>" || piece == "<s>" || piece == "</s>"; }

// A minimal protobuf reader for sentencepiece.ModelProto: field 1 holds the
// pieces, each a message with piece = 1 (string) and score = 2 (float).
class ProtoReader {
 public:
  explicit ProtoReader(std::string_view bytes) : bytes_(bytes) {}
  bool done() const { return pos_ >= bytes_.size(); }
  bool varint(uint64_t* out) {
    *out = 0;
    for (int shift = 0; shift < 64 && pos_ < bytes_.size(); shift += 7) {
      uint8_t byte = static_cast<uint8_t>(bytes_[pos_++]);
      *out |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return true;
    }
    return false;
  }
  // Reads one field; for length-delimited fields *payload is its bytes, for a
  // 32-bit field its 4 bytes.
  bool field(uint32_t* number, uint32_t* wire_type, std::string_view* payload) {
    uint64_t key = 0, length = 0;
    if (!varint(&key)) return false;
    *number = static_cast<uint32_t>(key >> 3);
    *wire_type = static_cast<uint32_t>(key & 7);
    switch (*wire_type) {
      case 0: return varint(&length);
      case 1: length = 8; break;
      case 2: if (!varint(&length)) return false; break;
      case 5: length = 4; break;
      default: return false;
    }
    if (length > bytes_.size() - pos_) return false;
    *payload = bytes_.substr(pos_, length);
    pos_ += length;
    return true;
  }

 private:
  std::string_view bytes_;
  size_t pos_ = 0;
};

size_t utf8_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xe) return 3;
  if ((lead >> 3) == 0x1e) return 4;
  return 1;  // a stray continuation byte stands alone
}

}  // namespace

void Tokenizer::add_piece(std::string piece, float score) {
  if (!is_control_piece(piece)) {
    index_.emplace(piece, static_cast<int32_t>(pieces_.size()));
    max_piece_bytes_ = std::max(max_piece_bytes_, piece.size());
  }
  pieces_.push_back(std::move(piece));
  scores_.push_back(score);
}

Result<Tokenizer> Tokenizer::load(const fs::path& vocab_or_model) {
  SN_ASSIGN(std::string bytes, read_file(vocab_or_model));
  Tokenizer t;
  if (vocab_or_model.extension() == ".model") {
    ProtoReader model(bytes);
    uint32_t number = 0, wire_type = 0;
    std::string_view payload;
    while (!model.done()) {
      if (!model.field(&number, &wire_type, &payload))
        return make_error("{}: not a SentencePiece model (malformed protobuf)", vocab_or_model.string());
      if (number != 1 || wire_type != 2) continue;
      ProtoReader entry(payload);
      std::string piece;
      float score = 0;
      while (!entry.done()) {
        if (!entry.field(&number, &wire_type, &payload))
          return make_error("{}: not a SentencePiece model (malformed piece)", vocab_or_model.string());
        if (number == 1 && wire_type == 2) piece = std::string(payload);
        if (number == 2 && wire_type == 5) std::memcpy(&score, payload.data(), 4);  // little-endian host
      }
      t.add_piece(std::move(piece), score);
    }
  } else {
    return parse_vocab(bytes, vocab_or_model.string());
  }
  if (t.pieces_.size() < 3 || t.pieces_[0] != "<unk>" || t.pieces_[static_cast<size_t>(kEndOfLine)] != "</s>")
    return make_error("{}: not a SentencePiece vocabulary (expected <unk>, <s>, </s> first)", vocab_or_model.string());
  return t;
}

Result<Tokenizer> Tokenizer::parse_vocab(std::string_view text, std::string_view what) {
  Tokenizer t;
  std::istringstream lines{std::string(text)};
  std::string line;
  while (std::getline(lines, line)) {
    auto tab = line.rfind('\t');  // the piece itself may be a tab
    if (tab == std::string::npos)
      return make_error("{}:{}: expected \"piece<TAB>score\"", what, t.pieces_.size() + 1);
    t.add_piece(line.substr(0, tab), std::strtof(line.c_str() + tab + 1, nullptr));
  }
  if (t.pieces_.size() < 3 || t.pieces_[0] != "<unk>" || t.pieces_[static_cast<size_t>(kEndOfLine)] != "</s>")
    return make_error("{}: not a SentencePiece vocabulary (expected <unk>, <s>, </s> first)", what);
  return t;
}

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
    if (piece == "<s>") continue;
    std::string text;
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, kSpace.size(), kSpace) == 0) {
        text += ' ';
        i += kSpace.size();
      } else {
        text += piece[i++];
      }
    }
    // SentencePiece prefixes every line with a word boundary (its "dummy prefix").
    if (line_start && !text.empty() && text[0] == ' ') text.erase(0, 1);
    out += text;
    line_start = false;
  }
  return out;
}

void Tokenizer::encode_line(std::string_view line, std::vector<int32_t>* ids) const {
  if (line.empty()) return;  // spm_encode turns an empty line into no pieces
  std::string text = kSpace;
  for (char c : line) text += (c == ' ') ? kSpace : std::string(1, c);
  std::vector<std::string> symbols;
  for (size_t i = 0; i < text.size();) {
    size_t n = std::min(utf8_length(static_cast<unsigned char>(text[i])), text.size() - i);
    symbols.push_back(text.substr(i, n));
    i += n;
  }
  // Quadratic in the line's length, which is fine for lines of text; a heap
  // over pairs (as sentencepiece does) would be needed for megabyte lines.
  for (;;) {
    size_t best = symbols.size();
    float best_score = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = index_.find(symbols[i] + symbols[i + 1]);
      if (it == index_.end()) continue;
      float score = scores_[static_cast<size_t>(it->second)];
      if (best == symbols.size() || score > best_score) {
        best = i;
        best_score = score;
      }
    }
    if (best == symbols.size()) break;
    symbols[best] += symbols[best + 1];
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  for (const auto& symbol : symbols) {
    auto it = index_.find(symbol);
    ids->push_back(it == index_.end() ? kUnknown : it->second);
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  size_t line_begin = 0;
  for (;;) {
    size_t line_end = text.find('\n', line_begin);
    encode_line(text.substr(line_begin, line_end == std::string_view::npos ? std::string_view::npos
                                                                             : line_end - line_begin),
                &ids);
    if (line_end == std::string_view::npos) break;
    ids.push_back(kEndOfLine);
    line_begin = line_end + 1;
  }
  return ids;
}

Dataset::Dataset(std::vector<int32_t> tokens, int64_t seq_len, double holdout_fraction)
    : tokens_(std::move(tokens)), seq_len_(seq_len) {
  total_ = seq_len_ > 0 ? static_cast<int64_t>(tokens_.size()) / (seq_len_ + 1) : 0;
  int64_t holdout = static_cast<int64_t>(static_cast<double>(total_) * std::clamp(holdout_fraction, 0.0, 1.0));
  train_ = total_ - holdout;
}

std::vector<int64_t> Dataset::epoch_order(int64_t epoch, uint64_t seed, int64_t shard, int64_t shards) const {
  std::vector<int64_t> order;
  for (int64_t i = shard; i < train_; i += shards) order.push_back(i);
  Hasher hasher;
  hasher.update("dataset-epoch").update_u64(seed).update_u64(static_cast<uint64_t>(epoch));
  if (shards > 1) hasher.update_u64(static_cast<uint64_t>(shard)).update_u64(static_cast<uint64_t>(shards));
  Hash256 h = hasher.finish();
  uint64_t s = 0;
  for (int i = 0; i < 8; ++i) s |= static_cast<uint64_t>(h[static_cast<size_t>(i)]) << (8 * i);
  std::mt19937_64 rng(s);  // its output sequence is fixed by the standard
  for (auto i = static_cast<int64_t>(order.size()) - 1; i > 0; --i) {
    // Unbiased bounded draw by rejection (std::uniform_int_distribution is implementation-defined).
    uint64_t bound = static_cast<uint64_t>(i + 1), limit = UINT64_MAX - UINT64_MAX % bound, r;
    do r = rng(); while (r >= limit);
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(r % bound)]);
  }
  return order;
}

std::shared_ptr<const std::vector<int64_t>> Dataset::cached_order(int64_t epoch, uint64_t seed, int64_t shard,
                                                                  int64_t shards) const {
  std::lock_guard<std::mutex> lock(*cache_mutex_);
  auto key = std::make_tuple(epoch, seed, shard, shards);
  auto it = permutations_.find(key);
  if (it != permutations_.end()) return it->second;
  if (permutations_.size() > static_cast<size_t>(4 * shards)) permutations_.clear();
  auto order = std::make_shared<const std::vector<int64_t>>(epoch_order(epoch, seed, shard, shards));
  permutations_.emplace(key, order);
  return order;
}

int64_t Dataset::shard_size(int64_t shard, int64_t shards) const {
  return shard < train_ ? (train_ - shard + shards - 1) / shards : 0;
}

int64_t Dataset::steps_per_epoch(int64_t global_batch, int64_t shards) const {
  if (train_ <= 0 || global_batch <= 0 || shards < 1 || global_batch % shards != 0) return 0;
  return shard_size(shards - 1, shards) / (global_batch / shards);  // the last shard is the smallest
}

std::vector<int64_t> Dataset::samples_for_step(int64_t step, int64_t global_batch, uint64_t seed,
                                               int64_t shards) const {
  std::vector<int64_t> ids;
  const int64_t steps = steps_per_epoch(global_batch, shards);
  if (steps == 0 || step < 0) return ids;
  const int64_t per_shard = global_batch / shards;
  const int64_t epoch = step / steps, first = (step % steps) * per_shard;
  for (int64_t shard = 0; shard < shards; ++shard) {
    auto order = cached_order(epoch, seed, shard, shards);
    ids.insert(ids.end(), order->begin() + first, order->begin() + first + per_shard);
  }
  return ids;
}

std::pair<torch::Tensor, torch::Tensor> Dataset::batch(const std::vector<int64_t>& sample_ids, bool holdout) const {
  const int64_t b = static_cast<int64_t>(sample_ids.size());
  torch::Tensor inputs = torch::empty({b, seq_len_}, torch::kInt64);
  torch::Tensor targets = torch::empty({b, seq_len_}, torch::kInt64);
  auto in = inputs.accessor<int64_t, 2>();
  auto out = targets.accessor<int64_t, 2>();
  const int64_t first = holdout ? train_ : 0, end = holdout ? total_ : train_;
  for (int64_t row = 0; row < b; ++row) {
    int64_t sample = sample_ids[static_cast<size_t>(row)] + first;
    TORCH_CHECK(sample >= first && sample < end, "Dataset::batch: sample id ", sample_ids[static_cast<size_t>(row)],
                " out of range for the ", holdout ? "held-out" : "training", " split");
    const int32_t* window = tokens_.data() + sample * (seq_len_ + 1);
    for (int64_t t = 0; t < seq_len_; ++t) {
      in[row][t] = window[t];
      out[row][t] = window[t + 1];
    }
  }
  return {inputs, targets};
}

}  // namespace sn::model
