// swift-tools-version: 6.0
import PackageDescription

/// The hot path keeps its state in raw memory it owns; dynamic exclusivity
/// checks there cost a few percent of CPU per request and prove nothing the
/// single-owner-thread design does not already guarantee.
let hotPath: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
    name: "Keel",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "keel", targets: ["keel"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/grpc/grpc-swift-2", from: "2.0.0"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport", from: "2.0.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.28.0"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.10.0"),
        .package(url: "https://github.com/apple/swift-crypto", "3.0.0" ..< "5.0.0"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.0.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.0.0"),
    ],
    targets: [
        // C libraries, through thin system-library targets.
        .systemLibrary(name: "CLiburing", pkgConfig: "liburing",
                       providers: [.apt(["liburing-dev"])]),
        .systemLibrary(name: "CLibNBD", pkgConfig: "libnbd",
                       providers: [.apt(["libnbd-dev"])]),
        .systemLibrary(name: "CSQLite", pkgConfig: "sqlite3",
                       providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(name: "CGnuTLS", pkgConfig: "gnutls",
                       providers: [.apt(["libgnutls28-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd",
                       providers: [.apt(["libzstd-dev"])]),

        // Thin typed wrappers over the syscalls Keel uses outside io_uring.
        .systemLibrary(name: "CSyscalls"),
        .target(name: "Syscalls", dependencies: ["CSyscalls"]),
        // One io_uring per thread: submission, completion, registered buffers.
        .target(name: "IOUring", dependencies: ["CLiburing", "Syscalls"], swiftSettings: hotPath),
        // The NBD protocol as pure state machines: bytes in, bytes out.
        .target(name: "NBDProtocol", swiftSettings: hotPath),
        // Whole client byte streams through those state machines, each step checked
        // against the protocol: the fuzzer's driver (Bench/fuzz) and its replays.
        .target(name: "NBDStreamReplay", dependencies: ["NBDProtocol"]),
        // TLS sessions over memory buffers (GnuTLS): credentials from a certificate directory or a PSK file.
        .target(name: "TLSSession", dependencies: ["CGnuTLS"]),
        // The NBD server core: connections on io_uring, dispatch to a block device.
        .target(name: "NBDServer", dependencies: [
            "NBDProtocol", "IOUring", "Syscalls", "TLSSession",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hotPath),
        // A raw image file as an NBD block device (O_DIRECT, read-modify-write).
        .target(name: "FileExport", dependencies: [
            "NBDServer", "NBDProtocol", "IOUring", "Syscalls", "CSyscalls",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hotPath),
        // Metadata: a thin wrapper over the SQLite C API.
        .target(name: "SQLite", dependencies: ["CSQLite"]),
        // A replica's data directory: head layer file and metadata, epoch fencing state.
        .target(name: "ReplicaStore", dependencies: ["SQLite", "Syscalls", "ReplicaIdentity", "LayerStack"]),
        // A replica's chain of layers (head and snapshots): extent maps, the resolved index, the layer files and map log.
        .target(name: "LayerStack", dependencies: ["Syscalls"], swiftSettings: hotPath),
        // SplitMix64 for the simulator, the fuzzers and the model tests: a seed replays.
        .target(name: "SeededRandom"),
        // Who owns a replica and the export name that carries the claim: shared by engine, replica and store.
        .target(name: "ReplicaIdentity"),
        // `keel replica serve`: a replica's head served over NBD, fenced by epoch.
        .target(name: "ReplicaServer", dependencies: [
            "ReplicaStore", "LayerStack", "FileExport", "CSyscalls", "NBDServer", "NBDProtocol", "IOUring", "ControlAPI", "ReplicaIdentity",
            .product(name: "GRPCCore", package: "grpc-swift-2"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hotPath),
        // The control API: .proto in Proto/, generated code committed (scripts/generate-proto).
        .target(name: "ControlAPI", dependencies: [
            "ReplicaIdentity",
            "Syscalls",
            .product(name: "GRPCCore", package: "grpc-swift-2"),
            .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
            .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        // The kernel's NBD driver over generic netlink: /dev/nbdX from sockets in transmission.
        .systemLibrary(name: "CNetlink"),
        .target(name: "KernelNBD", dependencies: ["CNetlink", "Syscalls"]),
        // The device-mapper linear device over /dev/nbdX that a host mounts: suspended while its engine switches.
        .systemLibrary(name: "CDeviceMapper"),
        .target(name: "DeviceMapper", dependencies: ["CDeviceMapper"]),
        // The host's device of a volume: /dev/nbdX held connected to the volume's engine, wherever it runs.
        .target(name: "DeviceFrontend", dependencies: [
            "ControlAPI", "DeviceMapper", "KernelNBD", .product(name: "GRPCCore", package: "grpc-swift-2"), "NBDProtocol", "Syscalls", "TLSSession", .product(name: "Logging", package: "swift-log"),
        ]),
        // `keel engine serve`: a volume's frontend, replicated synchronously to its replicas.
        .target(name: "Engine", dependencies: [
            "NBDServer", "NBDProtocol", "IOUring", "LibNBD", "RingLinks", "Syscalls", "ControlAPI", "ReplicaIdentity",
            .product(name: "GRPCCore", package: "grpc-swift-2"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hotPath),
        // The cluster's certificate authority and the node credentials it issues (X.509, ECDSA P-256).
        .target(name: "ClusterCA", dependencies: [
            "Syscalls",
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
        ]),
        // The node registry: the volumes this node created (SQLite in the state directory).
        .target(name: "NodeRegistry", dependencies: ["SQLite", "Syscalls"]),
        // The node's daemons (replicas, engines) as systemd units or processes of keel's own.
        .target(name: "Daemons", dependencies: ["Syscalls", "CSyscalls"]),
        // `keel node serve`: the gRPC API through which other nodes start, stop and list this node's engines.
        .target(name: "NodeAgent", dependencies: [
            "ControlAPI", "Daemons", "NodeRegistry", "Syscalls",
            .product(name: "GRPCCore", package: "grpc-swift-2"),
        ]),
        // A node's volumes: their daemons, devices, replicas and engines placed on other
        // nodes, failover; what `keel volume` does, callable without the CLI.
        .target(name: "Volumes", dependencies: [
            "ControlAPI", "Daemons", "DeviceFrontend", "KernelNBD", "NodeRegistry", "Syscalls",
            .product(name: "GRPCCore", package: "grpc-swift-2"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Client side: a Swift wrapper over libnbd.
        .target(name: "LibNBD", dependencies: ["CLibNBD", "Syscalls"]),
        // libnbd handles driven from an I/O thread's ring: the engine's links to replicas, a snapshot export's.
        .target(name: "RingLinks", dependencies: ["IOUring", "LibNBD", "NBDServer"], swiftSettings: hotPath),
        // `keel snapshot export`: a volume as of a snapshot, read from its replicas without claiming them.
        .target(name: "SnapshotExport", dependencies: [
            "NBDServer", "NBDProtocol", "IOUring", "LibNBD", "RingLinks", "Syscalls", "ReplicaIdentity",
            .product(name: "Logging", package: "swift-log"),
        ]),

        // Backups: a content-addressed store of zstd blocks, maps and summaries on a directory or S3 (docs/backups.md).
        .target(name: "BackupStore", dependencies: [
            "CZstd", "CSyscalls", "Syscalls", "LibNBD", "S3Client", .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
        // S3 requests: the SigV4 signer (tested against AWS's published examples), settings the AWS way, retries.
        .target(name: "S3Client", dependencies: [
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),

        .executableTarget(name: "keel", dependencies: [
            "NBDServer", "FileExport", "ReplicaServer", "ReplicaStore", "Engine", "LibNBD", "Syscalls", "ControlAPI",
            "NodeRegistry", "Daemons", "KernelNBD", "ReplicaIdentity", "SnapshotExport", "ClusterCA", "DeviceFrontend", "NodeAgent", "Volumes", "BackupStore",
            .product(name: "GRPCCore", package: "grpc-swift-2"),
            .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),

        // The replication core under a seeded storm of faults, single-threaded (docs/replication.md).
        .target(name: "Simulator", dependencies: [
            "SeededRandom",
            "Engine", "NBDServer", "NBDProtocol", "ReplicaServer", "ReplicaIdentity", "ControlAPI",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "keel-sim", dependencies: [
            "Simulator", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .testTarget(name: "NBDProtocolTests", dependencies: ["NBDProtocol", "NBDStreamReplay", "SeededRandom"]),
        .testTarget(name: "TLSSessionTests", dependencies: ["TLSSession", "ClusterCA"]),
        .testTarget(name: "IOUringTests", dependencies: ["IOUring", "Syscalls"]),
        .testTarget(name: "ReplicaStoreTests", dependencies: ["ReplicaStore", "SQLite", "ReplicaIdentity", "LayerStack"]),
        .testTarget(name: "BackupStoreTests", dependencies: ["BackupStore", "S3Client"]),
        .testTarget(name: "S3ClientTests", dependencies: ["S3Client", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "LayerStackTests", dependencies: ["LayerStack", "SeededRandom"]),
        .testTarget(name: "EngineUnitTests", dependencies: ["Engine", "ControlAPI", "RingLinks", "LibNBD"]),
        .testTarget(name: "ReplicaServerTests", dependencies: [
            "ReplicaServer", "ReplicaStore", "ReplicaIdentity",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "KernelNBDTests", dependencies: ["KernelNBD"]),
        .testTarget(name: "NodeTests", dependencies: ["NodeRegistry", "Daemons", "SQLite"]),
        .testTarget(name: "SimulatorTests", dependencies: ["Simulator"]),
        // Also runs Tests/KernelScenarios/*.sh in a QEMU guest with Debian's kernel (KernelTests).
        .testTarget(name: "IntegrationTests", dependencies: ["LibNBD", "NBDProtocol", "Syscalls", "SeededRandom", "Volumes", "NodeRegistry", "DeviceFrontend", "TLSSession", "ControlAPI"]),
    ],
    swiftLanguageModes: [.v5]
)
