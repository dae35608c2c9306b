// File helpers that never leave a half-written file behind.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "core/result.h"

namespace sn {

Result<std::string> read_file(const std::filesystem::path& path);
// Writes to PATH.tmp-<pid>, fsyncs, renames over PATH and fsyncs PATH's
// directory: readers see the old file or the new one, never a torn one, even if
// the process is killed, and the new one survives a crash once this returns.
Status write_file_atomic(const std::filesystem::path& path, std::string_view data,
                         int mode = 0644);
// Appends DATA to PATH (created if absent), all of it or an error. Not atomic:
// for files that are resumed from their size (partial downloads).
Status append_file(const std::filesystem::path& path, std::string_view data);
// Fsyncs FROM, renames it over TO and fsyncs TO's directory: TO is either
// absent or whole, even across a crash.
Status rename_durable(const std::filesystem::path& from, const std::filesystem::path& to);
// Fsyncs directory DIR: the entries made in it (renames, links) survive a crash.
Status sync_directory(const std::filesystem::path& dir);
// Creates DIR (and parents) and checks that it is writable.
Status ensure_directory(const std::filesystem::path& dir);

// The writes above that find the disk or the quota full (ENOSPC, EDQUOT)
// fail with kind resource_exhausted and the text "PATH: disk full (…)".
// Whether MESSAGE holds such an error (its own, or a peer's passed on in its
// text): the owner of that disk is out of room, not otherwise at fault.
bool says_disk_full(std::string_view message);
// Tests only: files written from now on under DIR find the disk full once
// FILES_LEFT of them were written whole; each takes half its data, then
// fails with ENOSPC. An empty DIR turns it off.
void simulate_disk_full_for_tests(const std::filesystem::path& dir, int files_left);

// Checks before any work starts that write_file_atomic(PATH) can succeed later: PATH
// is not a directory and its directory exists and is writable. Nothing is created.
// Input errors (exit 2) name FLAG, e.g. "--out runs/x/model.safetensors: directory
// runs/x does not exist".
Status check_output_file(const std::filesystem::path& path, std::string_view flag);
// Checks that PATH is a readable regular file (input error naming FLAG otherwise).
Status check_input_file(const std::filesystem::path& path, std::string_view flag);

}  // namespace sn
