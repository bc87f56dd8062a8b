import NBDProtocol
#if canImport(Glibc)
import Glibc
#endif

/// What every worker does with a request it runs as several system calls.
extension UnsafeMutablePointer where Pointee == IORequest {
    /// One more operation of the request in flight; `prepare` queues it with
    /// the user data its completion brings back (`sub` says which operation).
    @inlinable
    public func submitting(_ token: IOToken, sub: UInt8, _ prepare: (UInt64) -> Void) {
        pointee.pendingOperations += 1
        prepare(token.with(sub: sub).rawValue)
    }

    /// A system call failed: its errno becomes the NBD error the client gets,
    /// unless an earlier operation of the request failed first.
    public func fail(errno: Int32) {
        guard pointee.firstError == nil else { return }
        switch errno {
        case ENOSPC, EDQUOT, EFBIG: pointee.firstError = .noSpace
        case EPERM, EROFS, EACCES: pointee.firstError = .permission
        case ENOMEM: pointee.firstError = .noMemory
        default: pointee.firstError = .io
        }
    }
}
