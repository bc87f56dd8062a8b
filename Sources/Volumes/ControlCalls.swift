import ControlAPI
import Foundation
import GRPCCore
import NodeRegistry
import Syscalls

public typealias EngineStub = Keel_Control_V1_EngineControl.Client<ControlTransport>
public typealias NodeStub = Keel_Control_V1_NodeControl.Client<ControlTransport>
public typealias ReplicaStub = Keel_Control_V1_ReplicaControl.Client<ControlTransport>
public typealias FrontendStub = Keel_Control_V1_FrontendControl.Client<ControlTransport>

/// Calls a device frontend's control API (its `--control` address).
public func callFrontend<T: Sendable>(_ frontend: String, doing what: String,
                                      _ body: @escaping @Sendable (FrontendStub) async throws -> T) throws -> T {
    try callControl(frontend, option: "--frontend", refusing: "the device frontend at \(frontend)",
                    unreachable: "the device frontend's control API at \(frontend)", doing: what) { try await body(FrontendStub(wrapping: $0)) }
}

/// Calls an engine's control API (its `--control` address) from a command;
/// a refusal or an unreachable engine becomes one line for the user.
public func callEngine<T: Sendable>(_ engine: String, doing what: String,
                                    _ body: @escaping @Sendable (EngineStub) async throws -> T) throws -> T {
    try callControl(engine, option: "--engine", refusing: "the engine at \(engine)",
                    unreachable: "the engine's control API at \(engine)", doing: what) { try await body(EngineStub(wrapping: $0)) }
}

/// Calls a node agent; a refusal or an unreachable agent becomes one line.
public func callNode<T: Sendable>(_ node: String, doing what: String, started: (Task<Void, Never>) -> Void = { _ in },
                                  _ body: @escaping @Sendable (NodeStub) async throws -> T) throws -> T {
    try callControl(node, option: "node address", refusing: "the node agent at \(node)",
                    unreachable: "the node agent at \(node)", doing: what, started: started) { try await body(NodeStub(wrapping: $0)) }
}

private func callControl<T: Sendable>(_ address: String, option: String, refusing peer: String, unreachable: String,
                                      doing what: String, started: (Task<Void, Never>) -> Void = { _ in },
                                      _ body: @escaping @Sendable (GRPCClient<ControlTransport>) async throws -> T) throws -> T {
    let parsed = try parseListenAddress(address, option: option)
    do {
        return try blocking(started: started) { try await withControlClient(parsed, body) }
    } catch let error as RPCError where error.code != .unavailable {
        throw KeelError("\(peer) refused to \(what): \(error.message)")
    } catch let error as RPCError {
        throw KeelError("cannot reach \(unreachable): \(error.message)")
    } catch {
        throw KeelError("cannot reach \(unreachable): \(error)")
    }
}

/// A replica's status through its control API; a refusal becomes one line.
public func replicaStatus(_ control: Syscalls.SocketAddress) throws -> Keel_Control_V1_ReplicaStatus {
    do {
        return try blocking {
            try await withControlClient(control) { client in
                try await ReplicaStub(wrapping: client).status(.init(), options: .timeout(seconds: 5))
            }
        }
    } catch let error as RPCError {
        throw KeelError(error.message)
    }
}

extension CallOptions {
    public static func timeout(seconds: Int64) -> CallOptions {
        var options = CallOptions.defaults
        options.timeout = .seconds(seconds)
        return options
    }
}

/// Runs async client code from a synchronous command. `started` gets the
/// task that runs it, for a caller that may have to cancel it. The task runs
/// on threads of its own, not the cooperative pool: a caller that blocks a
/// pool thread (a test, say) cannot starve it into a timeout.
public func blocking<T: Sendable>(started: (Task<Void, Never>) -> Void = { _ in },
                                  _ body: @escaping @Sendable () async throws -> T) throws -> T {
    let result = Handoff<Result<T, Error>>()
    started(Task(executorPreference: BlockingCallsExecutor.shared) {
        do { result.put(.success(try await body())) } catch { result.put(.failure(error)) }
    })
    return try result.take().get()
}

private final class BlockingCallsExecutor: TaskExecutor {
    static let shared = BlockingCallsExecutor()
    private let queue = DispatchQueue(label: "keel.blocking-calls", attributes: .concurrent)

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        queue.async { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

public func parseListenAddress(_ text: String, option: String = "--listen") throws -> Syscalls.SocketAddress {
    do { return try Syscalls.SocketAddress(parsing: text) } catch {
        throw KeelError("invalid \(option): \(error)")
    }
}

/// This host as a node: its hostname.
public var thisNodeName: String { ProcessInfo.processInfo.hostName }

/// The certificates for calls to control APIs that require TLS: the named
/// directory, else $KEEL_TLS_CERTIFICATES, else for a TCP address the node's
/// own (STATE/tls/NAME, when there is one), else plaintext. A unix socket's
/// daemon is this node's: plaintext unless a directory is named.
public struct ControlCredentials: Sendable {
    public var certificates: String?

    public init(certificates: String? = nil) { self.certificates = certificates }

    public var forCalls: ControlTLS.ForCalls {
        let named = certificates ?? ProcessInfo.processInfo.environment["KEEL_TLS_CERTIFICATES"]
        return ControlTLS.ForCalls(overTCP: ControlTLS(certificates: named ?? nodeCredentialsDirectory()),
                                   overUnix: ControlTLS(certificates: named))
    }

    /// This process's control calls use these credentials from now on.
    public func apply() {
        ControlTLS.useForCalls(forCalls)
    }
}

/// The node's credentials when none are named: the one directory under
/// STATE/tls ($KEEL_STATE_DIR, else /var/lib/keel) that holds a node's
/// certificate, as `keel cert issue` leaves it on a node. None, or several, is nil.
public func nodeCredentialsDirectory(stateDirectory: String? = nil) -> String? {
    let state = stateDirectory ?? ProcessInfo.processInfo.environment["KEEL_STATE_DIR"] ?? NodeLayout.defaultStateDirectory
    let names = (try? FileManager.default.contentsOfDirectory(atPath: state + "/tls")) ?? []
    let found = names.map { "\(state)/tls/\($0)" }.filter { FileManager.default.fileExists(atPath: $0 + "/server-cert.pem") }
    return found.count == 1 ? found[0] : nil
}
