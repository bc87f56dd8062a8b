import CSyscalls
#if canImport(Glibc)
import Glibc
#endif

/// A joinable OS thread. Keel's I/O threads each own a ring, so they are
/// real threads rather than tasks that may hop between threads.
public final class PosixThread: @unchecked Sendable {
    private var thread = pthread_t()
    private final class Box { let body: () -> Void; init(_ body: @escaping () -> Void) { self.body = body } }

    public init(name: String, _ body: @escaping () -> Void) throws {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SystemError(errno: rc, "pthread_create")
        }
        pthread_setname_np(thread, String(name.prefix(15)))
    }

    public func join() {
        pthread_join(thread, nil)
    }
}

/// A one-shot hand-over of a value from one thread to another.
public final class Handoff<Value>: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var condition = pthread_cond_t()
    private var value: Value?

    public init() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&condition, nil)
    }

    deinit {
        pthread_mutex_destroy(&mutex)
        pthread_cond_destroy(&condition)
    }

    public func put(_ newValue: Value) {
        pthread_mutex_lock(&mutex)
        value = newValue
        pthread_cond_broadcast(&condition)
        pthread_mutex_unlock(&mutex)
    }

    public func take() -> Value {
        pthread_mutex_lock(&mutex)
        while value == nil { pthread_cond_wait(&condition, &mutex) }
        let result = value!
        pthread_mutex_unlock(&mutex)
        return result
    }
}

/// Polls `condition` every half millisecond for up to `seconds`: for waits
/// of a few milliseconds on state other threads change (requests draining).
public func pollUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
    for _ in 0..<max(1, Int(seconds * 2000)) {
        if condition() { return true }
        usleep(500)
    }
    return condition()
}
