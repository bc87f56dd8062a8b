import ControlAPI
import Dispatch
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// A gRPC server for a daemon's control API, run beside its I/O threads.
final class ControlServer: @unchecked Sendable {
    private let server: GRPCServer<HTTP2ServerTransport.Posix>
    private let finished = DispatchSemaphore(value: 0)
    private let address: Syscalls.SocketAddress

    /// Starts serving; returns once the address is bound, or throws a CLIError.
    init(address: Syscalls.SocketAddress, tls: ControlTLS = .plaintext, services: [any RegistrableRPCService]) throws {
        if case .unix(let path) = address {
            do { try Socket.removeStaleUnixSocket(at: path) } catch { throw CLIError("--control: \(error)") }
        }
        self.address = address
        server = GRPCServer(transport: .http2NIOPosix(address: address.grpcBindTarget, transportSecurity: tls.serverSecurity),
                            services: services)
        let bound = Handoff<Result<Void, Error>>()
        Task { [server, finished] in
            do { try await server.serve() } catch { bound.put(.failure(error)) }
            finished.signal()
        }
        Task { [server] in
            do {
                if try await server.listeningAddress != nil { bound.put(.success(())) }
            } catch { bound.put(.failure(error)) }
        }
        if case .failure(let error) = bound.take() {
            throw CLIError("cannot serve the control API on \(address): \(error)")
        }
        // Only its owner may call it: the control API can remove snapshots and replicas.
        if case .unix(let path) = address { chmod(path, 0o600) }
    }

    private let stopped = Mutex(false)

    /// Stops serving (once; later calls return at once).
    func stop() {
        guard !stopped.withLock({ was in defer { was = true }; return was }) else { return }
        server.beginGracefulShutdown()
        finished.wait()
        if case .unix(let path) = address { unlink(path) }
    }
}

/// Runs async client code from a synchronous command. `started` gets the
/// task that runs it, for a caller that may have to cancel it.
func blocking<T: Sendable>(started: (Task<Void, Never>) -> Void = { _ in },
                           _ body: @escaping @Sendable () async throws -> T) throws -> T {
    let result = Handoff<Result<T, Error>>()
    started(Task {
        do { result.put(.success(try await body())) } catch { result.put(.failure(error)) }
    })
    return try result.take().get()
}
