import ControlAPI
import GRPCCore
import Syscalls

/// A long-lived client of one replica's control API, for threads that are not
/// async: each call blocks until the answer or its deadline.
public final class ReplicaControlClient: Sendable {
    public typealias Stub = Keel_Control_V1_ReplicaControl.Client<ControlTransport>

    public let address: Syscalls.SocketAddress
    private let client: GRPCClient<ControlTransport>

    public init(address: Syscalls.SocketAddress) throws {
        self.address = address
        client = GRPCClient(transport: try .http2NIOPosix(target: address.grpcTarget,
                                                          transportSecurity: ControlTLS.calls(to: address).clientSecurity))
        Task { [client] in try? await client.runConnections() }
    }

    deinit { client.beginGracefulShutdown() }

    /// Starts a call; `take()` on the result waits for it.
    public func start<T: Sendable>(timeout seconds: Double,
                                   _ body: @escaping @Sendable (Stub, CallOptions) async throws -> T) -> Handoff<Result<T, Error>> {
        let result = Handoff<Result<T, Error>>()
        var options = CallOptions.defaults
        options.timeout = .milliseconds(Int64(seconds * 1000))
        let stub = Stub(wrapping: client)
        Task {
            do { result.put(.success(try await body(stub, options))) } catch { result.put(.failure(error)) }
        }
        return result
    }

    public func call<T: Sendable>(timeout seconds: Double,
                                  _ body: @escaping @Sendable (Stub, CallOptions) async throws -> T) throws -> T {
        try start(timeout: seconds, body).take().get()
    }
}
