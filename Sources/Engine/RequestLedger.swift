import NBDProtocol
import NBDServer
#if canImport(Glibc)
import Glibc
#endif

/// The engine's accounting of one request, apart from how its commands
/// travel (libnbd in `EngineWorker`, memory in the simulator): how many
/// replica commands are pending, how many succeeded, its phase, and what its
/// answer is once the last command is in.
///
///     issuing ──(the gate admits a write)──▶ admitted
///        │                                      │
///        └───────(last command in)──────────────┴──▶ answered (exactly once)
///
/// While a request's commands are being submitted it holds one extra pending
/// count, because libnbd may complete commands inside the submit call (a link
/// found dead): the request must not be answered before every command it will
/// have is counted.
public enum RequestLedger {
    static let issuing: UInt8 = 1
    static let admitted: UInt8 = 2
    static let answered: UInt8 = 3

    public enum Disposition: Equatable {
        /// Hand the answer back now.
        case answer
        /// Hold it until the newest membership is persisted.
        case hold
    }

    public static func begin(_ r: UnsafeMutablePointer<IORequest>) {
        r.pointee.pendingOperations = 0
        r.pointee.progress = 0
        r.pointee.firstError = nil
        r.pointee.phase = issuing
    }

    /// The gate let this write go: it leaves the gate when answered.
    public static func admit(_ r: UnsafeMutablePointer<IORequest>) {
        precondition(r.pointee.phase == issuing, "a write admitted twice")
        r.pointee.phase = admitted
    }

    public static func holdWhileIssuing(_ r: UnsafeMutablePointer<IORequest>) {
        r.pointee.pendingOperations += 1
    }

    /// The issuing hold goes; true when nothing is pending any more.
    public static func releaseIssuingHold(_ r: UnsafeMutablePointer<IORequest>) -> Bool {
        precondition(r.pointee.pendingOperations > 0, "request's pending count went below its issuing hold")
        r.pointee.pendingOperations -= 1
        return r.pointee.pendingOperations == 0
    }

    public enum Submission {
        /// On its way: its answer comes through `commandFinished`.
        case sent
        /// The link died inside the submit, which answered the command (and
        /// every other one queued on that link) before it returned.
        case completedInside
        /// It never reached the link and was never answered.
        case notSent
    }

    /// Sends one command of the request: counted *before* `submit`, because
    /// the transport may complete it inside the call. True when it is
    /// accounted for (on its way or already answered).
    public static func send(_ r: UnsafeMutablePointer<IORequest>, _ submit: () -> Submission) -> Bool {
        r.pointee.pendingOperations += 1
        switch submit() {
        case .sent, .completedInside:
            return true
        case .notSent:
            precondition(r.pointee.pendingOperations > 0)
            r.pointee.pendingOperations -= 1
            return false
        }
    }

    public enum Finished: Equatable {
        /// Other commands are still pending.
        case pending
        /// A read failed everywhere it was tried so far: try the next replica (counted as pending).
        case retryRead
        /// The last command is in: settle the request.
        case last
    }

    /// Replica `replica` answered one command with `error` (0: success). A
    /// replica that refuses an older epoch (ESHUTDOWN) fences the engine;
    /// any other error fails that replica. A read that replica answered
    /// after it left RW is read again elsewhere: re-added meanwhile, its head
    /// may have been rewritten by its chain copy before the read ran.
    public static func commandFinished(_ r: UnsafeMutablePointer<IORequest>, replica: Int, error: Int32,
                                       replicas: ReplicaSet) -> Finished {
        let staleRead = error == 0 && r.pointee.command == .read && replicas.mode(replica) != .rw
        if staleRead {
            // Neither progress nor a failure: the replica has already left.
        } else if error == 0 {
            r.pointee.progress += 1
        } else if error == ESHUTDOWN {
            replicas.fence(by: replica)
        } else {
            replicas.fail(replica, reason: "\(r.pointee.command) failed: \(String(cString: strerror(error)))")
        }
        precondition(r.pointee.pendingOperations > 0, "a replica answered a request with no command pending")
        r.pointee.pendingOperations -= 1
        if (error != 0 || staleRead) && r.pointee.command == .read && r.pointee.progress == 0 {
            r.pointee.pendingOperations += 1
            return .retryRead
        }
        return r.pointee.pendingOperations == 0 ? .last : .pending
    }

    /// Every replica involved has answered: the write leaves the gate, and the
    /// answer is decided. FLUSH answers wait like write answers: a FLUSH that
    /// a failed replica did not do must not be acknowledged while that replica
    /// is still a member on disk.
    public static func settle(_ r: UnsafeMutablePointer<IORequest>, replicas: ReplicaSet, gate: WriteGate) -> Disposition {
        let phase = r.pointee.phase
        precondition(phase == issuing || phase == admitted, "a request answered twice")
        r.pointee.phase = answered
        if phase == admitted {
            gate.finish(offset: r.pointee.offset, length: UInt64(r.pointee.length))
        }
        // The hold is decided before the fence is looked at: `holdsAcknowledgements`
        // is false once fenced, and such an answer must then be EIO (fencing never ends).
        let holds = replicas.holdsAcknowledgements
        let durable: Bool
        switch r.pointee.command {
        case .write, .trim, .writeZeroes, .flush: durable = true
        default: durable = false
        }
        // A replica that answered may have failed since (another request's
        // error): with no RW replica left, none is known to hold this one.
        if (r.pointee.progress == 0 || replicas.isFenced || (durable && !replicas.hasHealthyReplica))
            && r.pointee.firstError == nil {
            r.pointee.firstError = .io
        }
        return durable && holds ? .hold : .answer
    }

    /// A held answer is released: with no healthy replica left it fails, since
    /// no replica is known to hold it.
    public static func release(_ r: UnsafeMutablePointer<IORequest>, replicas: ReplicaSet) {
        if !replicas.hasHealthyReplica || replicas.isFenced { r.pointee.firstError = .io }
    }
}
