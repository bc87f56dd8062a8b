import ArgumentParser
import Foundation
import NodeRegistry
import Volumes

extension Volume {
    struct Attach: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Attach a volume to this host: prints /dev/nbdX and /dev/keel/NAME.",
            discussion: """
                Starts the volume's local replicas and its engine if they are not running, then its \
                device frontend (keel frontend serve), which holds /dev/nbdX connected to the engine. \
                A device the volume is still attached to while no engine serves it (the engine died) \
                gets the new engine without I/O errors. Refused while a live engine elsewhere is \
                connected to the volume's replicas, unless --force.
                Example: keel volume attach db && mkfs.ext4 /dev/keel/db
                """)

        @OptionGroup var target: VolumeTarget

        @Option(help: "The device to attach, /dev/nbdN (default: a free one the kernel picks).")
        var device: String?

        @Flag(help: "Take the volume over from an engine elsewhere that is still connected to its replicas.")
        var force = false

        @Option(help: "Seconds to wait for the engine to serve and the device to be attached.")
        var timeout: Double = 120

        @Flag(help: "Put a device-mapper device over /dev/nbdX and print it (/dev/mapper/keel-NAME; /dev/keel/NAME points at it): mounted instead of /dev/nbdX, its engine can be migrated live (keel migrate).")
        var mapper = false

        @Option(help: "Seconds the kernel lets a request run before it gives up on its connection and retries it on another (the device frontend's --io-timeout, 30 by default); a lost engine is replaced after that.")
        var ioTimeout: UInt64?

        @Flag(help: "Start only the engine, with no kernel device: prints its NBD URI for user-space clients (qemu, fio's nbd engine, nbdcopy). keel volume attach without it adds the device later.")
        var noDevice = false

        @OptionGroup var control: ControlClientOptions

        func validate() throws {
            try validateDevice(device)
            if noDevice && device != nil { throw ValidationError("--no-device attaches no device: drop --device") }
            if noDevice && mapper { throw ValidationError("--no-device attaches no device: drop --mapper") }
            if let ioTimeout, !(1...3600).contains(ioTimeout) { throw ValidationError("--io-timeout must be between 1 and 3600 seconds") }
        }

        func run() throws {
            let node = try Node(target.node)
            if noDevice {
                let uri = try node.startEngineOnly(target.name, force: force, timeout: timeout, credentials: control.credentials)
                if target.json { return try printJSON(["volume": target.name, "uri": uri]) }
                return print(uri)
            }
            let (device, link) = try node.attach(target.name, device: device, force: force, timeout: timeout,
                                                 mapper: mapper, ioTimeout: ioTimeout, credentials: control.credentials)
            if target.json { return try printJSON(["volume": target.name, "device": device, "link": link ?? NSNull()] as [String: Any]) }
            print(device)
            if let link { print(link) } else {
                fputs("keel: no /dev/keel/\(target.name): udev is not running or Keel's rule is not installed (Udev/60-keel.rules)\n", stderr)
            }
        }
    }

    struct Detach: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Detach a volume: its frontend drains the device's I/O and detaches it; its engine stops.",
            discussion: """
                The replicas keep running. Unmount the filesystem first. With --keep-engine the engine \
                goes on serving no device (the frontend disabled): snapshot revert and backups of a \
                detached volume use it; keel volume attach attaches the device again.
                Example: keel volume detach db
                """)

        @OptionGroup var target: VolumeTarget

        @Flag(help: "Only detach the device; the engine keeps running.")
        var keepEngine = false

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            let node = try Node(target.node)
            let (device, result) = try node.detach(target.name, keepEngine: keepEngine, credentials: control.credentials)
            if target.json { return try printJSON(["volume": target.name, "device": device ?? NSNull(), "result": result] as [String: Any]) }
            print("volume \(target.name): \(result)")
        }
    }
}
