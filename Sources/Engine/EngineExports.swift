import NBDProtocol

/// The engine's one export, counting the NBD clients in transmission: a
/// revert waits for none to be attached (the kernel's device is counted by
/// its frontend).
public struct EngineExports: ExportCatalog {
    private let exports: StaticExports
    private let device: EngineDevice

    public init(device: EngineDevice, export: ExportDescription) {
        exports = StaticExports([export])
        self.device = device
    }

    public var listed: [ExportDescription] { exports.listed }

    public func resolve(_ name: String, opening: Bool) -> ExportResolution { exports.resolve(name, opening: opening) }

    public func transmissionStarted(_ export: ExportDescription) { device.clients.add(1, ordering: .relaxed) }
    public func transmissionEnded(_ export: ExportDescription) { device.clients.subtract(1, ordering: .relaxed) }
}
