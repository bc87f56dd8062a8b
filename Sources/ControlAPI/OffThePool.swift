import Dispatch

/// Runs a blocking call (a sync, a libnbd call, a wait for requests to
/// drain) on a dispatch thread: a control API's handlers run on Swift's
/// cooperative pool, where blocking would stall every other call.
public func offThePool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, Error>) in
        DispatchQueue.global().async {
            do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: error) }
        }
    }
}
