// The OpenAI-compatible gateway: HTTP on cpp-httplib, generation through an
// Engine. Each generation runs on a thread of its own and hands its tokens to
// the HTTP side through a queue, so a stream's status line is sent only once
// the first token (or an error) is known, and a client that stops reading is
// noticed at the next write and cancels the generation.
#include "infer/gateway.h"

#include <httplib.h>
#include <sys/socket.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

namespace sn::infer {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int kMaxConcurrencyLimit = 1024;
constexpr size_t kMaxStops = 4;
constexpr size_t kMaxStopBytes = 256;
constexpr int kDefaultCompletionTokens = 16;   // OpenAI's default for /v1/completions
constexpr int kDefaultChatTokens = 256;
constexpr size_t kLatencyWindow = 4096;
constexpr double kRateWindowS = 5.0;

std::string dump(const json& value) {
  // Token texts are valid UTF-8 by the engine's contract; replace rather than
  // throw if one is not.
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

// An error answered in OpenAI's shape: {"error": {message, type, param, code}}.
struct HttpError {
  int status = 400;
  std::string message;
  std::string param;               // empty: null
  std::string code;                // empty: null
};

const char* error_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 429: return "rate_limit_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

json error_json(const HttpError& error) {
  json body = {{"message", error.message},
               {"type", error_type(error.status)},
               {"param", error.param.empty() ? json(nullptr) : json(error.param)},
               {"code", error.code.empty() ? json(nullptr) : json(error.code)}};
  return json{{"error", body}};
}

HttpError bad_request(std::string message, std::string param = "", std::string code = "") {
  return HttpError{400, std::move(message), std::move(param), std::move(code)};
}

// What an engine's error during a generation becomes over HTTP: the caller's
// fault is a 400, a network that cannot serve right now a 503 (retry later),
// anything else 500. The model itself was found before generating (an unknown
// one is the gateway's own 404), so not_found here means blocks that no live
// server covers any more: a 503 too.
HttpError from_engine_error(const Error& error) {
  switch (error.kind) {
    case ErrorKind::invalid_input: return bad_request(error.message);
    case ErrorKind::not_found:
    case ErrorKind::unavailable:
    case ErrorKind::timeout:
    case ErrorKind::bad_peer:
    case ErrorKind::resource_exhausted: return HttpError{503, error.message, "", "engine_unavailable"};
    default: return HttpError{500, error.message, "", "internal_error"};
  }
}

// The most recent samples of a latency, for percentiles.
class SampleWindow {
 public:
  void add(double value) {
    if (samples_.size() < kLatencyWindow) samples_.push_back(value);
    else samples_[next_] = value;
    next_ = (next_ + 1) % kLatencyWindow;
  }
  double percentile(double q) const {
    if (samples_.empty()) return 0;
    std::vector<double> sorted = samples_;
    const size_t at = std::min(sorted.size() - 1, static_cast<size_t>(q * static_cast<double>(sorted.size())));
    std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(at), sorted.end());
    return sorted[at];
  }

 private:
  std::vector<double> samples_;
  size_t next_ = 0;
};

// A parsed, validated generation request.
struct GenerationRequest {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;      // stream_options.include_usage
  std::vector<int32_t> prompt;
  SamplingParams params;           // params.stop stays empty: the gateway applies stops itself
  std::vector<std::string> stops;
};

// One generation, shared by the thread that runs it and the HTTP side.
struct Generation {
  GenerationRequest request;
  std::string id;
  int64_t created = 0;
  Clock::time_point start;

  std::mutex mutex;
  std::condition_variable changed;
  std::deque<std::string> pending;  // one entry per token: the text it releases (maybe empty)
  bool finished = false;
  std::optional<HttpError> error;
  std::string text;                 // generated so far (after a stop: cut before it)
  size_t released = 0;              // bytes of text already queued for the client
  bool hit_stop = false;
  int completion_tokens = 0;
  int prompt_tokens = 0;
  std::string finish_reason;
  double first_token_s = 0;
  std::atomic<bool> client_gone{false};
};

// Length of the longest suffix of TEXT that could be the start of a stop
// string: that much is held back until the next token decides.
size_t stop_prefix_length(const std::string& text, const std::vector<std::string>& stops) {
  size_t longest = 0;
  for (const auto& stop : stops)
    for (size_t n = std::min(stop.size() - 1, text.size()); n > longest; --n)
      if (text.compare(text.size() - n, n, stop, 0, n) == 0) {
        longest = n;
        break;
      }
  return longest;
}

std::string random_id(const char* prefix) {
  static std::mutex mutex;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard lock(mutex);
  return fmt::format("{}{:016x}{:08x}", prefix, rng(), static_cast<uint32_t>(rng()));
}

int64_t unix_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

bool constant_time_equal(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// ---- request fields: each check names the field and what it must be ----

std::optional<HttpError> read_bool(const json& body, const char* field, bool& out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) return bad_request(fmt::format("'{}' must be a boolean", field), field, "invalid_type");
  out = it->get<bool>();
  return std::nullopt;
}

std::optional<HttpError> read_number(const json& body, const char* field, double low, double high, bool low_open,
                                     double& out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return bad_request(fmt::format("'{}' must be a number", field), field, "invalid_type");
  const double value = it->get<double>();
  if (!(low_open ? value > low : value >= low) || !(value <= high))
    return bad_request(fmt::format("'{}' must be in {}{}, {}], got {}", field, low_open ? "(" : "[", low, high, value),
                       field, "invalid_value");
  out = value;
  return std::nullopt;
}

// An integer field; FOUND tells whether it was given.
std::optional<HttpError> read_integer(const json& body, const char* field, int64_t low, int64_t high, int64_t& out,
                                      bool* found = nullptr) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer())
    return bad_request(fmt::format("'{}' must be an integer", field), field, "invalid_type");
  // nlohmann keeps non-negative integers unsigned: compare each kind in its own type.
  const bool too_big = it->is_number_unsigned() ? it->get<uint64_t>() > static_cast<uint64_t>(high)
                                                : it->get<int64_t>() > high;
  const bool too_small = it->is_number_unsigned() ? low > 0 && it->get<uint64_t>() < static_cast<uint64_t>(low)
                                                  : it->get<int64_t>() < low;
  if (too_big || too_small)
    return bad_request(fmt::format("'{}' must be in {}..{}", field, low, high), field, "invalid_value");
  out = it->is_number_unsigned() ? static_cast<int64_t>(it->get<uint64_t>()) : it->get<int64_t>();
  if (found) *found = true;
  return std::nullopt;
}

std::optional<HttpError> read_stops(const json& body, std::vector<std::string>& out) {
  auto it = body.find("stop");
  if (it == body.end() || it->is_null()) return std::nullopt;
  std::vector<json> items;
  if (it->is_string()) items.push_back(*it);
  else if (it->is_array()) items.assign(it->begin(), it->end());
  else return bad_request("'stop' must be a string or a list of strings", "stop", "invalid_type");
  if (items.size() > kMaxStops)
    return bad_request(fmt::format("'stop' may hold at most {} strings, got {}", kMaxStops, items.size()), "stop",
                       "invalid_value");
  for (const auto& item : items) {
    if (!item.is_string()) return bad_request("'stop' must be a string or a list of strings", "stop", "invalid_type");
    const auto& stop = item.get_ref<const std::string&>();
    if (stop.empty() || stop.size() > kMaxStopBytes)
      return bad_request(fmt::format("each stop string must be 1..{} bytes, got {}", kMaxStopBytes, stop.size()),
                         "stop", "invalid_value");
    out.push_back(stop);
  }
  return std::nullopt;
}

// A chat message's content: a string, or a list of {"type": "text", "text": ...} parts.
std::optional<HttpError> read_content(const json& message, size_t index, std::string& out) {
  const std::string param = fmt::format("messages[{}].content", index);
  auto it = message.find("content");
  if (it == message.end() || it->is_null()) return std::nullopt;  // e.g. an assistant turn with no text
  if (it->is_string()) {
    out = it->get<std::string>();
    return std::nullopt;
  }
  if (!it->is_array()) return bad_request(fmt::format("'{}' must be a string or a list of text parts", param), param,
                                          "invalid_type");
  for (const auto& part : *it) {
    if (!part.is_object() || part.value("type", json()) != "text" || !part.contains("text") ||
        !part["text"].is_string())
      return bad_request(fmt::format("'{}': only parts of type \"text\" with a string \"text\" are supported", param),
                         param, "invalid_type");
    out += part["text"].get<std::string>();
  }
  return std::nullopt;
}

std::string role_label(const std::string& role) {
  if (role == "system" || role == "developer") return "System";
  if (role == "user") return "User";
  return "Assistant";
}

// httplib 0.11 listens with a backlog of 5: a burst of clients (64 streams
// opened at once) overflows it and some connections are reset. The listening
// socket is a protected member; listen() again raises the backlog.
class HttpServer : public httplib::Server {
 public:
  void raise_backlog(int backlog) {
    const auto fd = svr_sock_.load();
    if (fd != INVALID_SOCKET) ::listen(fd, backlog);
  }
};

}  // namespace

std::string render_chat(const std::vector<ChatMessage>& messages) {
  std::string text;
  for (const auto& message : messages) text += role_label(message.role) + ": " + message.content + "\n";
  return text + "Assistant:";
}

struct Gateway::Impl {
  std::shared_ptr<Engine> engine;
  GatewayOptions options;
  HttpServer server;
  std::thread listener;
  int port = 0;
  Clock::time_point started = Clock::now();
  int64_t created = unix_seconds();

  std::atomic<bool> stopping{false};
  std::atomic<int> in_flight{0};       // generation slots taken
  std::mutex threads_mutex;
  std::condition_variable threads_done;
  int threads = 0;                     // generation threads still running

  mutable std::mutex metrics_mutex;
  uint64_t requests = 0, completions = 0, cancelled = 0, rejected = 0, errors = 0, tokens = 0;
  SampleWindow token_gaps_ms, first_token_ms;
  std::deque<Clock::time_point> recent_tokens;  // within the rate window

  void count(uint64_t Impl::*counter) {
    std::lock_guard lock(metrics_mutex);
    ++(this->*counter);
  }

  void log(const httplib::Request& req, int status, const Generation* generation, bool stream,
           const std::string& error) {
    log(req.method, req.path, status, generation, stream, error);
  }

  void log(const std::string& method, const std::string& path, int status, const Generation* generation, bool stream,
           const std::string& error) {
    if (!options.on_request) return;
    GatewayRequestLog entry{method, path, status, stream};
    entry.error = error;
    if (generation) {
      entry.prompt_tokens = generation->prompt_tokens;
      entry.completion_tokens = generation->completion_tokens;
      entry.finish_reason = generation->finish_reason;
      entry.first_token_s = generation->first_token_s;
      entry.total_s = std::chrono::duration<double>(Clock::now() - generation->start).count();
    }
    options.on_request(entry);
  }

  void respond_error(const httplib::Request& req, httplib::Response& res, const HttpError& error) {
    count(error.status == 429 ? &Impl::rejected : &Impl::errors);
    res.status = error.status;
    if (error.status == 429 || error.status == 503) res.set_header("Retry-After", "1");
    res.set_content(dump(error_json(error)), "application/json");
    log(req, error.status, nullptr, false, error.message);
  }

  std::optional<HttpError> check_model(const json& body) const {
    auto it = body.find("model");
    if (it == body.end() || it->is_null()) return std::nullopt;  // the one model this gateway serves
    if (!it->is_string()) return bad_request("'model' must be a string", "model", "invalid_type");
    const auto& name = it->get_ref<const std::string&>();
    const ModelCard& card = engine->card();
    if (name == card.id || name == card.name) return std::nullopt;
    return HttpError{404, fmt::format("The model '{}' does not exist: this gateway serves '{}' ({})", name, card.id,
                                      card.name),
                     "model", "model_not_found"};
  }

  // Validates BODY into OUT; the first problem found is returned.
  std::optional<HttpError> parse(const json& body, bool chat, GenerationRequest& out) const {
    if (auto error = check_model(body)) return error;
    out.chat = chat;
    std::string prompt_text;
    const char* prompt_param = chat ? "messages" : "prompt";
    if (chat) {
      auto it = body.find("messages");
      if (it == body.end()) return bad_request("'messages' is required", "messages", "missing_field");
      if (!it->is_array() || it->empty())
        return bad_request("'messages' must be a non-empty list of {role, content}", "messages", "invalid_type");
      std::vector<ChatMessage> messages;
      for (size_t i = 0; i < it->size(); ++i) {
        const json& message = (*it)[i];
        if (!message.is_object() || !message.contains("role") || !message["role"].is_string())
          return bad_request(fmt::format("'messages[{}]' must be an object with a string 'role'", i),
                             fmt::format("messages[{}]", i), "invalid_type");
        ChatMessage parsed{message["role"].get<std::string>(), ""};
        if (parsed.role != "system" && parsed.role != "developer" && parsed.role != "user" &&
            parsed.role != "assistant")
          return bad_request(fmt::format("'messages[{}].role' must be system, user or assistant, got '{}'", i,
                                         parsed.role),
                             fmt::format("messages[{}].role", i), "invalid_value");
        if (auto error = read_content(message, i, parsed.content)) return error;
        messages.push_back(std::move(parsed));
      }
      prompt_text = render_chat(messages);
    } else {
      auto it = body.find("prompt");
      if (it == body.end() || it->is_null()) return bad_request("'prompt' is required", "prompt", "missing_field");
      if (it->is_array() && it->size() == 1 && (*it)[0].is_string()) prompt_text = (*it)[0].get<std::string>();
      else if (it->is_string()) prompt_text = it->get<std::string>();
      else return bad_request("'prompt' must be a string (or a list of one string)", "prompt", "invalid_type");
    }

    int64_t n = 1;
    if (auto error = read_integer(body, "n", 1, 1, n)) return bad_request("only 'n': 1 is supported", "n", "invalid_value");
    if (auto error = read_bool(body, "stream", out.stream)) return error;
    if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
      if (!it->is_object()) return bad_request("'stream_options' must be an object", "stream_options", "invalid_type");
      if (auto error = read_bool(*it, "include_usage", out.include_usage)) return error;
    }
    SamplingParams& params = out.params;
    if (auto error = read_number(body, "temperature", 0, 2, false, params.temperature)) return error;
    if (auto error = read_number(body, "top_p", 0, 1, true, params.top_p)) return error;
    int64_t seed = -1;
    bool seed_given = false;
    if (auto error = read_integer(body, "seed", 0, INT64_MAX, seed, &seed_given)) return error;
    params.seed = seed_given ? static_cast<uint64_t>(seed) : std::random_device{}();
    if (auto error = read_stops(body, out.stops)) return error;
    if (auto error = read_bool(body, "truncate_prompt", params.truncate_prompt)) return error;

    const int64_t context = engine->card().config.seq_len;
    int64_t max_tokens = 0;
    bool max_given = false;
    const char* max_field = "max_tokens";
    if (chat && body.contains("max_completion_tokens") && !body["max_completion_tokens"].is_null())
      max_field = "max_completion_tokens";
    if (auto error = read_integer(body, max_field, 1, INT32_MAX, max_tokens, &max_given)) return error;
    if (max_given && max_tokens > context - 1)
      return bad_request(fmt::format("'{}' is {}, but this model's context is {} tokens: at most {} new tokens fit "
                                     "after a 1-token prompt",
                                     max_field, max_tokens, context, context - 1),
                         max_field, "context_length_exceeded");

    if (prompt_text.empty()) return bad_request(fmt::format("the {} is empty (0 tokens)", chat ? "conversation" : "prompt"),
                                                prompt_param, "empty_prompt");
    out.prompt = engine->encode(prompt_text);
    const int64_t prompt_tokens = static_cast<int64_t>(out.prompt.size());
    if (prompt_tokens == 0)
      return bad_request(fmt::format("the {} encodes to 0 tokens", chat ? "conversation" : "prompt"), prompt_param,
                         "empty_prompt");
    const int64_t default_max = chat ? kDefaultChatTokens : kDefaultCompletionTokens;
    if (params.truncate_prompt) {
      // Keep the prompt's last tokens, leaving room for the reply.
      if (!max_given) max_tokens = std::min(default_max, prompt_tokens >= context ? context / 2 : context - prompt_tokens);
      const int64_t keep = std::min(prompt_tokens, context - max_tokens);
      out.prompt.erase(out.prompt.begin(), out.prompt.end() - keep);
    } else if (prompt_tokens >= context) {
      return bad_request(fmt::format("This model's maximum context length is {} tokens, but the {} has {} tokens "
                                     "(ask for \"truncate_prompt\": true to keep its last tokens)",
                                     context, chat ? "conversation" : "prompt", prompt_tokens),
                         prompt_param, "context_length_exceeded");
    } else if (!max_given) {
      max_tokens = std::min(default_max, context - prompt_tokens);
    } else if (prompt_tokens + max_tokens > context) {
      return bad_request(fmt::format("'{}' is {}, but this model's context is {} tokens and the {} takes {}: at most "
                                     "{} new tokens fit",
                                     max_field, max_tokens, context, chat ? "conversation" : "prompt", prompt_tokens,
                                     context - prompt_tokens),
                         max_field, "context_length_exceeded");
    }
    params.max_tokens = static_cast<int>(max_tokens);
    if (chat)
      for (const auto& stop : chat_stop_strings()) out.stops.push_back(stop);
    if (auto checked = check_sampling(params); !checked.ok()) return bad_request(checked.message());
    return std::nullopt;
  }

  // Runs GENERATION to its end on this thread; the HTTP side reads its queue.
  void run(Generation& generation) {
    const GenerationRequest& request = generation.request;
    std::optional<Clock::time_point> last_token;
    auto on_token = [&](const TokenEvent& event) -> bool {
      const auto now = Clock::now();
      const double gap_ms = std::chrono::duration<double, std::milli>(now - last_token.value_or(generation.start)).count();
      {
        std::lock_guard lock(metrics_mutex);
        ++tokens;
        (last_token ? token_gaps_ms : first_token_ms).add(gap_ms);
        recent_tokens.push_back(now);
        while (!recent_tokens.empty() &&
               std::chrono::duration<double>(now - recent_tokens.front()).count() > kRateWindowS)
          recent_tokens.pop_front();
      }
      if (!last_token) generation.first_token_s = gap_ms / 1e3;
      last_token = now;
      bool go_on = true;
      {
        std::lock_guard lock(generation.mutex);
        generation.completion_tokens = event.index + 1;
        generation.text += event.text;
        size_t releasable = generation.text.size();
        size_t cut = std::string::npos;
        for (const auto& stop : request.stops) cut = std::min(cut, generation.text.find(stop));
        if (cut != std::string::npos) {
          generation.text.resize(cut);
          generation.hit_stop = true;
          releasable = cut;
          go_on = false;
        } else {
          releasable -= stop_prefix_length(generation.text, request.stops);
        }
        releasable = std::max(releasable, generation.released);
        generation.pending.push_back(generation.text.substr(generation.released, releasable - generation.released));
        generation.released = releasable;
      }
      generation.changed.notify_all();
      if (go_on && options.token_delay.count() > 0) std::this_thread::sleep_for(options.token_delay);
      return go_on && !generation.client_gone.load() && !stopping.load();
    };
    Result<GenerationStats> result = make_error("not run");
    try {
      result = engine->generate(request.prompt, request.params, on_token);
    } catch (const std::exception& e) {
      std::string message = e.what();
      result = make_error("the engine failed: {}", message.substr(0, message.find('\n')));
    }
    {
      std::lock_guard lock(generation.mutex);
      generation.prompt_tokens = static_cast<int>(request.prompt.size());
      if (!result.ok()) {
        generation.error = from_engine_error(result.error());
      } else {
        generation.prompt_tokens = result->prompt_tokens;
        if (generation.hit_stop) generation.finish_reason = "stop";
        else if (generation.client_gone.load() || result->finish_reason == "cancelled") generation.finish_reason = "cancelled";
        else generation.finish_reason = result->finish_reason.empty() ? "length" : result->finish_reason;
      }
      generation.finished = true;
    }
    generation.changed.notify_all();
    std::lock_guard lock(metrics_mutex);
    if (result.ok()) ++(generation.finish_reason == "cancelled" ? cancelled : completions);
  }

  // A generation slot, or nothing at max_concurrency (or while stopping).
  bool acquire_slot() {
    if (stopping.load()) return false;
    if (in_flight.fetch_add(1) >= options.max_concurrency) {
      in_flight.fetch_sub(1);
      return false;
    }
    return true;
  }

  // The JSON of one answer or stream chunk.
  json envelope(const Generation& generation, bool chunk) const {
    return json{{"id", generation.id},
                {"object", generation.request.chat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                                   : "text_completion"},
                {"created", generation.created},
                {"model", engine->card().id}};
  }

  json choice(const Generation& generation, const std::string& text, const json& finish_reason, bool chunk) const {
    if (!generation.request.chat)
      return json{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", finish_reason}};
    json message = chunk ? json{{"content", text}} : json{{"role", "assistant"}, {"content", text}};
    if (chunk && text.empty() && !finish_reason.is_null()) message = json::object();
    return json{{"index", 0}, {chunk ? "delta" : "message", message}, {"logprobs", nullptr}, {"finish_reason", finish_reason}};
  }

  json usage(const Generation& generation) const {
    return json{{"prompt_tokens", generation.prompt_tokens},
                {"completion_tokens", generation.completion_tokens},
                {"total_tokens", generation.prompt_tokens + generation.completion_tokens}};
  }

  void handle_generation(const httplib::Request& req, httplib::Response& res, bool chat) {
    count(&Impl::requests);
    // httplib bounds Content-Length bodies, not chunked ones: the same limit here.
    if (req.body.size() > options.max_body_bytes)
      return respond_error(req, res, HttpError{413, fmt::format("the request body is larger than the limit of {} bytes",
                                                                options.max_body_bytes), "", ""});
    json body = json::parse(req.body, nullptr, false);
    if (body.is_discarded())
      return respond_error(req, res, bad_request("the request body is not valid JSON", "", "invalid_json"));
    if (!body.is_object()) return respond_error(req, res, bad_request("the request body must be a JSON object", "", "invalid_json"));
    auto generation = std::make_shared<Generation>();
    if (auto error = parse(body, chat, generation->request)) return respond_error(req, res, *error);
    if (!acquire_slot())
      return respond_error(req, res, HttpError{429, fmt::format("too many concurrent requests: this gateway runs at "
                                                                "most {} at once; retry shortly",
                                                                options.max_concurrency),
                                               "", "rate_limit_exceeded"});
    generation->id = random_id(chat ? "chatcmpl-" : "cmpl-");
    generation->created = unix_seconds();
    generation->start = Clock::now();
    generation->prompt_tokens = static_cast<int>(generation->request.prompt.size());
    {
      std::lock_guard lock(threads_mutex);
      ++threads;
    }
    std::thread([this, generation] {
      run(*generation);
      in_flight.fetch_sub(1);
      std::lock_guard lock(threads_mutex);
      --threads;
      threads_done.notify_all();
    }).detach();

    // Wait for the first token or the end: an error before any token gets its
    // own status, not a 200 stream.
    {
      std::unique_lock lock(generation->mutex);
      if (generation->request.stream)
        generation->changed.wait(lock, [&] { return generation->finished || !generation->pending.empty(); });
      else
        generation->changed.wait(lock, [&] { return generation->finished; });
      if (generation->error && generation->pending.empty()) {
        HttpError error = *generation->error;
        lock.unlock();
        return respond_error(req, res, error);
      }
    }
    if (!generation->request.stream) {
      json answer = envelope(*generation, false);
      if (generation->error) {  // failed after some tokens: no partial answer
        return respond_error(req, res, *generation->error);
      }
      answer["choices"] = json::array({choice(*generation, generation->text, generation->finish_reason, false)});
      answer["usage"] = usage(*generation);
      res.set_content(dump(answer), "application/json");
      log(req, 200, generation.get(), false, "");
      return;
    }
    stream(req, res, generation);
  }

  void stream(const httplib::Request& req, httplib::Response& res, const std::shared_ptr<Generation>& generation) {
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    auto log_once = std::make_shared<std::once_flag>();
    const std::string method = req.method, path = req.path;  // the log needs them after the handler returns
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, generation, log_once, method, path](size_t, httplib::DataSink& sink) {
          auto send = [&](const json& event) {
            const std::string line = "data: " + dump(event) + "\n\n";
            return sink.write(line.data(), line.size());
          };
          auto gone = [&] {
            generation->client_gone = true;
            generation->changed.notify_all();
            return false;  // httplib closes the connection
          };
          if (generation->request.chat) {
            json first = envelope(*generation, true);
            first["choices"] = json::array({json{{"index", 0}, {"delta", {{"role", "assistant"}, {"content", ""}}},
                                                 {"logprobs", nullptr}, {"finish_reason", nullptr}}});
            if (!send(first)) return gone();
          }
          std::unique_lock lock(generation->mutex);
          for (;;) {
            generation->changed.wait(lock, [&] { return generation->finished || !generation->pending.empty(); });
            std::deque<std::string> texts;
            texts.swap(generation->pending);
            const bool finished = generation->finished;
            lock.unlock();
            for (const auto& text : texts) {
              json event = envelope(*generation, true);
              event["choices"] = json::array({choice(*generation, text, nullptr, true)});
              if (!send(event)) return gone();
            }
            lock.lock();
            if (finished && generation->pending.empty()) break;
          }
          // What was held back as a possible stop string, then the finish.
          const std::string tail = generation->text.substr(std::min(generation->released, generation->text.size()));
          const std::optional<HttpError> error = generation->error;
          const std::string finish_reason = generation->finish_reason;
          lock.unlock();
          if (error) {
            if (!send(error_json(*error))) return gone();
          } else {
            json event = envelope(*generation, true);
            event["choices"] = json::array({choice(*generation, tail, finish_reason, true)});
            if (!send(event)) return gone();
            if (generation->request.include_usage) {
              json last = envelope(*generation, true);
              last["choices"] = json::array();
              last["usage"] = usage(*generation);
              if (!send(last)) return gone();
            }
          }
          static const std::string done = "data: [DONE]\n\n";
          if (!sink.write(done.data(), done.size())) return gone();
          sink.done();
          std::call_once(*log_once, [&] { log(method, path, 200, generation.get(), true, error ? error->message : ""); });
          return true;
        },
        [this, generation, log_once, method, path](bool success) {
          // The response is gone (sent, or the client left): a generation still
          // running for it is cancelled at its next token.
          if (!success) generation->client_gone = true;
          generation->changed.notify_all();
          if (!success) {
            // The generation may still be finishing; its counts are as of now.
            std::call_once(*log_once, [&] { log(method, path, 200, generation.get(), true, "the client went away"); });
          }
        });
  }

  void handle_models(const httplib::Request& req, httplib::Response& res) {
    count(&Impl::requests);
    const ModelCard& card = engine->card();
    json model = {{"id", card.id},
                  {"object", "model"},
                  {"created", created},
                  {"owned_by", "solvernet"},
                  {"name", card.name},
                  {"context_length", card.config.seq_len}};
    if (req.matches.size() > 1) {
      const std::string wanted = req.matches[1];
      if (wanted != card.id && wanted != card.name)
        return respond_error(req, res, HttpError{404, fmt::format("The model '{}' does not exist", wanted), "model",
                                                 "model_not_found"});
      res.set_content(dump(model), "application/json");
      return;
    }
    res.set_content(dump(json{{"object", "list"}, {"data", json::array({model})}}), "application/json");
  }

  GatewayMetrics metrics() const {
    GatewayMetrics m;
    m.sessions_open = std::max(0, in_flight.load());
    m.max_concurrency = options.max_concurrency;
    m.uptime_s = std::chrono::duration<double>(Clock::now() - started).count();
    std::lock_guard lock(metrics_mutex);
    m.requests = requests;
    m.completions = completions;
    m.cancelled = cancelled;
    m.rejected = rejected;
    m.errors = errors;
    m.tokens = tokens;
    const auto now = Clock::now();
    const auto recent = std::count_if(recent_tokens.begin(), recent_tokens.end(), [&](const auto& t) {
      return std::chrono::duration<double>(now - t).count() <= kRateWindowS;
    });
    m.tokens_per_s = static_cast<double>(recent) / std::min(kRateWindowS, std::max(1.0, m.uptime_s));
    m.token_latency_p50_ms = token_gaps_ms.percentile(0.50);
    m.token_latency_p95_ms = token_gaps_ms.percentile(0.95);
    m.first_token_p50_ms = first_token_ms.percentile(0.50);
    return m;
  }

  void handle_metrics(httplib::Response& res) {
    const GatewayMetrics m = metrics();
    json body = json{{"sessions_open", m.sessions_open},
                     {"max_concurrency", m.max_concurrency},
                     {"requests", m.requests},
                     {"completions", m.completions},
                     {"cancelled", m.cancelled},
                     {"rejected", m.rejected},
                     {"errors", m.errors},
                     {"tokens", m.tokens},
                     {"tokens_per_s", m.tokens_per_s},
                     {"token_latency_p50_ms", m.token_latency_p50_ms},
                     {"token_latency_p95_ms", m.token_latency_p95_ms},
                     {"first_token_p50_ms", m.first_token_p50_ms},
                     {"uptime_s", m.uptime_s},
                     {"model", engine->card().id}};
    if (options.engine_metrics) body["engine"] = options.engine_metrics();
    res.set_content(dump(body), "application/json");
  }

  bool authorized(const httplib::Request& req) const {
    if (options.api_keys.empty()) return true;
    const std::string header = req.get_header_value("Authorization");
    static const std::string kBearer = "Bearer ";
    if (header.compare(0, kBearer.size(), kBearer) != 0) return false;
    const std::string key = header.substr(kBearer.size());
    bool match = false;
    for (const auto& allowed : options.api_keys) match |= constant_time_equal(key, allowed);
    return match;
  }

  void install_routes() {
    server.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (authorized(req)) return httplib::Server::HandlerResponse::Unhandled;
      respond_error(req, res,
                    HttpError{401,
                              req.has_header("Authorization") ? "Incorrect API key provided"
                                                              : "Missing API key: send 'Authorization: Bearer KEY'",
                              "", "invalid_api_key"});
      return httplib::Server::HandlerResponse::Handled;
    });
    server.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) { handle_models(req, res); });
    server.Get(R"(/v1/models/([^/]+))",
               [this](const httplib::Request& req, httplib::Response& res) { handle_models(req, res); });
    server.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      handle_generation(req, res, false);
    });
    server.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      handle_generation(req, res, true);
    });
    server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) { handle_metrics(res); });
    // Statuses httplib sets itself (no route, body too large, malformed HTTP)
    // get a body in OpenAI's shape too.
    server.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& req,
                                                                         httplib::Response& res) {
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      std::string message = fmt::format("{} {}: HTTP status {}", req.method, req.path, res.status);
      if (res.status == 413)
        message = req.get_header_value("Content-Type").rfind("application/x-www-form-urlencoded", 0) == 0
                      ? "the body was sent as a form (Content-Type: application/x-www-form-urlencoded); send JSON "
                        "with Content-Type: application/json"
                      : fmt::format("the request body is larger than the limit of {} bytes", options.max_body_bytes);
      else if (res.status == 404)
        message = fmt::format("no such endpoint: {} {} (see GET /v1/models, POST /v1/completions, "
                              "POST /v1/chat/completions, GET /metrics)", req.method, req.path);
      count(&Impl::errors);
      res.set_content(dump(error_json(HttpError{res.status, message, "", ""})), "application/json");
      return httplib::Server::HandlerResponse::Handled;
    }));
    server.set_exception_handler([this](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
      std::string message = "unknown exception";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        message = e.what();
        message = message.substr(0, message.find('\n'));
      } catch (...) {
      }
      respond_error(req, res, HttpError{500, "internal error: " + message, "", "internal_error"});
    });
  }
};

Gateway::Gateway(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Gateway::~Gateway() { stop(); }

int Gateway::port() const { return impl_->port; }

GatewayMetrics Gateway::metrics() const { return impl_->metrics(); }

Result<std::unique_ptr<Gateway>> Gateway::start(std::shared_ptr<Engine> engine, const GatewayOptions& options) {
  if (!engine) return make_error("gateway started without an engine");
  if (options.max_concurrency < 1 || options.max_concurrency > kMaxConcurrencyLimit)
    return input_error("max concurrency must be in 1..{}, got {}", kMaxConcurrencyLimit, options.max_concurrency);
  if (options.port < 0 || options.port > 65535) return input_error("port must be in 0..65535, got {}", options.port);
  for (const auto& key : options.api_keys)
    if (key.empty()) return input_error("an API key is empty");
  auto impl = std::make_unique<Impl>();
  impl->engine = std::move(engine);
  impl->options = options;
  HttpServer& server = impl->server;
  // Every generation holds a pool thread while it streams; the spare ones
  // answer models, metrics and 429s meanwhile.
  const size_t pool = static_cast<size_t>(options.max_concurrency) + 8;
  server.new_task_queue = [pool] { return new httplib::ThreadPool(pool); };
  server.set_payload_max_length(options.max_body_bytes);
  server.set_keep_alive_timeout(2);  // an idle keep-alive connection holds a pool thread
  server.set_read_timeout(10, 0);
  server.set_write_timeout(10, 0);
  server.set_tcp_nodelay(true);      // a token is a small write: send it now
  impl->install_routes();
  if (options.port == 0) {
    impl->port = server.bind_to_any_port(options.host);
    if (impl->port <= 0) return kind_error(ErrorKind::unavailable, "cannot listen on {} (any port)", options.host);
  } else {
    if (!server.bind_to_port(options.host, options.port))
      return kind_error(ErrorKind::unavailable, "cannot listen on {}:{} (in use, or not an address of this machine)",
                        options.host, options.port);
    impl->port = options.port;
  }
  server.raise_backlog(1024);
  Impl* raw = impl.get();
  impl->listener = std::thread([raw] { raw->server.listen_after_bind(); });
  return std::unique_ptr<Gateway>(new Gateway(std::move(impl)));
}

void Gateway::stop() {
  if (!impl_ || impl_->stopping.exchange(true)) return;
  // Running generations see `stopping` at their next token and end; their
  // streams then finish, which lets the server's pool drain.
  impl_->server.stop();
  if (impl_->listener.joinable()) impl_->listener.join();
  std::unique_lock lock(impl_->threads_mutex);
  impl_->threads_done.wait(lock, [&] { return impl_->threads == 0; });
}

}  // namespace sn::infer
