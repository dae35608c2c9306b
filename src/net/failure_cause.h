// The typed cause of a node's failed job request (FailureCause), carried in
// its gRPC status's details: the client decides on it (Fleet::blame), never
// on the message, which is for people.
#pragma once

#include <grpcpp/grpcpp.h>

#include <utility>

#include "core/result.h"
#include "proto/solvernet.pb.h"

namespace sn::net {

// ERROR with CAUSE in its details, for net::to_grpc. LOCAL_DATA goes with
// kind unavailable, DISK_FULL with resource_exhausted.
inline Error with_failure_cause(Error error, solvernet::v1::FailureCause::Cause cause) {
  solvernet::v1::FailureCause typed;
  typed.set_cause(cause);
  error.details = typed.SerializeAsString();
  return error;
}

// The FailureCause STATUS carries, CAUSE_UNSPECIFIED if none. Only with its
// own status code: a Refusal (PERMISSION_DENIED, FAILED_PRECONDITION) parses
// as a FailureCause too, with causes of the same numbers.
inline solvernet::v1::FailureCause::Cause failure_cause_of(const grpc::Status& status) {
  using Cause = solvernet::v1::FailureCause;
  Cause typed;
  if (status.error_details().empty() || !typed.ParseFromString(status.error_details())) return Cause::CAUSE_UNSPECIFIED;
  const bool fits =
      (typed.cause() == Cause::LOCAL_DATA && status.error_code() == grpc::StatusCode::UNAVAILABLE) ||
      (typed.cause() == Cause::DISK_FULL && status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  return fits ? typed.cause() : Cause::CAUSE_UNSPECIFIED;
}

}  // namespace sn::net
