#if canImport(Glibc)
import Glibc
#endif

/// The Linux CPU scheduling policies a server may run its threads under
/// (both fair-share: nice values apply, no privilege is needed).
public enum SchedulingPolicy: String, CaseIterable, Sendable {
    /// SCHED_OTHER: a woken thread may preempt the one running.
    case normal
    /// SCHED_BATCH: a woken thread waits for the running one's turn to end.
    /// A replica woken for every request its engine sends then takes them in
    /// batches when it shares cores with the engine and other replicas.
    case batch

    private var value: Int32 {
        switch self {
        case .normal: SCHED_OTHER
        case .batch: 3  // SCHED_BATCH: Glibc's header exports it only under _GNU_SOURCE
        }
    }

    /// Sets the calling thread's policy; the threads it starts afterwards inherit it.
    public func applyToThisThread() throws {
        var parameters = sched_param(sched_priority: 0)
        guard sched_setscheduler(0, value, &parameters) == 0 else {
            throw SystemError.current("sched_setscheduler(\(rawValue))")
        }
    }
}
