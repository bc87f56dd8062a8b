import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Bounds blocking libnbd calls: when it expires, the connections' sockets are
/// shut down, so the call in progress fails instead of waiting forever on a
/// replica that stopped answering.
final class Deadline: @unchecked Sendable {
    private final class Flag: Sendable { let fired = Atomic<Bool>(false) }
    private let work: DispatchWorkItem
    private let flag = Flag()

    init(seconds: Double, descriptors: [Int32]) {
        let work = DispatchWorkItem { [flag] in
            flag.fired.store(true, ordering: .relaxed)
            for fd in descriptors where fd >= 0 { shutdown(fd, Int32(SHUT_RDWR)) }
        }
        self.work = work
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds, execute: work)
    }

    var expired: Bool { flag.fired.load(ordering: .relaxed) }

    func cancel() { work.cancel() }
}
