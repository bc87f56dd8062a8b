import IOUring
import Logging
import NBDProtocol
import Syscalls
import TLSSession

/// An NBD server: a listening socket shared by `threads` I/O threads, each
/// with its own ring, all serving one block device.
public final class Server<Device: BlockDevice>: @unchecked Sendable {

    private let device: Device
    private let listener: FileDescriptor
    private let logger: Logger
    private var ioThreads: [IOThread<Device>] = []
    private var osThreads: [PosixThread] = []

    private let catalog: any ExportCatalog
    private let tls: ServerTLS
    private let threadCount: Int

    public init(device: Device, listener: FileDescriptor, catalog: any ExportCatalog, tls: ServerTLS = .off,
                threads: Int, logger: Logger) {
        self.device = device
        self.listener = listener
        self.catalog = catalog
        self.tls = tls
        self.logger = logger
        threadCount = max(1, threads)
    }

    /// One export of the whole device under `exportName` (and the default name "").
    public convenience init(device: Device, listener: FileDescriptor, exportName: String, tls: ServerTLS = .off,
                            threads: Int, logger: Logger) {
        let export = ExportDescription(name: exportName, size: device.size, readOnly: device.readOnly)
        self.init(device: device, listener: listener, catalog: StaticExports([export]), tls: tls, threads: threads,
                  logger: logger)
    }

    /// Starts the I/O threads; returns once each has set up its ring, or throws the first failure.
    public func start() throws {
        for id in 0..<threadCount {
            let thread = try IOThread(id: id, device: device, catalog: catalog, listener: listener, tls: tls,
                                      configuration: .init(), logger: logger)
            let ready = Handoff<Result<Void, Error>>()
            let os = try PosixThread(name: "keel-io-\(id)") { [logger] in
                do { try thread.setUp() } catch {
                    ready.put(.failure(error))
                    return
                }
                ready.put(.success(()))
                do { try thread.run() } catch {
                    logger.critical("I/O thread \(id) failed: \(error)")
                }
            }
            ioThreads.append(thread)
            osThreads.append(os)
            if case .failure(let error) = ready.take() {
                stop()
                wait()
                throw error
            }
        }
    }

    /// Asks every thread to finish in-flight requests and close its connections.
    public func stop() {
        for thread in ioThreads { thread.wake.signal() }
    }

    /// Waits for all threads to end.
    public func wait() {
        for thread in osThreads { thread.join() }
        osThreads.removeAll()
    }
}

/// Whether the listener offers TLS (STARTTLS), requires it, and what it
/// proves itself with. Sessions run on the I/O threads, over memory buffers.
public struct ServerTLS: Sendable {
    public let policy: Handshake.TLSPolicy
    public let credentials: TLSCredentials?

    public static let off = ServerTLS(policy: .off, credentials: nil)

    public init(policy: Handshake.TLSPolicy, credentials: TLSCredentials?) {
        precondition(policy == .off || credentials != nil, "TLS offered without credentials")
        self.policy = policy
        self.credentials = policy == .off ? nil : credentials
    }
}
