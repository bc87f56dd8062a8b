import Foundation

/// 10 GiB, 512 MiB, 4096 B.
func humanSize(_ bytes: UInt64) -> String {
    let units: [(UInt64, String)] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
    for (unit, name) in units where bytes >= unit {
        let value = Double(bytes) / Double(unit)
        return value == value.rounded() ? "\(bytes / unit) \(name)" : String(format: "%.1f %@", value, name)
    }
    return "\(bytes) B"
}

func printJSON(_ object: Any) throws {
    let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
    print(String(decoding: data, as: UTF8.self))
}
