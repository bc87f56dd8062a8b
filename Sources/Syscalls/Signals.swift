#if canImport(Glibc)
import Glibc
#endif

/// Termination signals are taken synchronously: block them in every thread
/// (threads inherit the mask) and let one thread wait for them.
public enum TerminationSignals {
    private static func set() -> sigset_t {
        var mask = sigset_t()
        sigemptyset(&mask)
        sigaddset(&mask, SIGINT)
        sigaddset(&mask, SIGTERM)
        return mask
    }

    /// Call before starting any thread.
    public static func block() {
        var mask = set()
        pthread_sigmask(SIG_BLOCK, &mask, nil)
        signal(SIGPIPE, SIG_IGN)
    }

    /// True once SIGINT or SIGTERM has arrived (blocked, so pending): for work that polls.
    public static var arePending: Bool {
        var pending = sigset_t()
        sigpending(&pending)
        return sigismember(&pending, SIGINT) == 1 || sigismember(&pending, SIGTERM) == 1
    }

    /// Blocks until SIGINT or SIGTERM arrives; returns the signal number.
    public static func wait() -> Int32 {
        var mask = set()
        var received: Int32 = 0
        while sigwait(&mask, &received) != 0 {}
        return received
    }
}
