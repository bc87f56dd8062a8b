import Foundation

/// Workers that block (in a read, a write, a request) on threads of their own. On Linux, libdispatch's
/// global queue runs about one item per core and does not see a blocked one as idle: four workers
/// queued there ran as two and left the cores waiting on I/O.
final class WorkerThreads: Sendable {
    private let group = DispatchGroup()

    /// Starts `count` threads, each running `body` with its index.
    init(count: Int, _ body: @escaping @Sendable (Int) -> Void) {
        for index in 0 ..< count {
            group.enter()
            let thread = Thread { [group] in
                body(index)
                group.leave()
            }
            thread.name = "keel-worker-\(index)"
            thread.start()
        }
    }

    /// Until every worker returned, or the timeout.
    func wait(timeout: DispatchTime) -> DispatchTimeoutResult { group.wait(timeout: timeout) }

    func wait() { group.wait() }
}
