import ControlAPI
import Dispatch
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
import Volumes
#endif

/// A gRPC server for a daemon's control API, run beside its I/O threads.
final class ControlServer: @unchecked Sendable {
    private let server: GRPCServer<HTTP2ServerTransport.Posix>
    private let finished = DispatchSemaphore(value: 0)
    private let address: Syscalls.SocketAddress
    /// The unix socket's path at stop (it may have been renamed meanwhile).
    private let pathAtStop: @Sendable () -> String?

    /// Starts serving; returns once the address is bound, or throws a KeelError.
    init(address: Syscalls.SocketAddress, tls: ControlTLS = .plaintext, services: [any RegistrableRPCService],
         pathAtStop: (@Sendable () -> String?)? = nil) throws {
        if case .unix(let path) = address {
            do { try Socket.removeStaleUnixSocket(at: path) } catch { throw KeelError("--control: \(error)") }
        }
        self.address = address
        self.pathAtStop = pathAtStop ?? { address.unixPath }
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
            throw KeelError("cannot serve the control API on \(address): \(error)")
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
        if let path = pathAtStop() { unlink(path) }
    }
}

