import Foundation
import S3Client

/// Where a backup store keeps its objects: a directory or an S3 bucket and prefix.
/// Keys are relative paths ("blocks/ab/ab12…"). Every call is synchronous and may run
/// on several threads at once.
public protocol BackupTarget: AnyObject, Sendable {
    /// The URL the user gave, for messages.
    var url: String { get }
    /// The object's bytes, or nil when there is none.
    func get(_ key: String) throws -> [UInt8]?
    func exists(_ key: String) throws -> Bool
    /// Writes a whole object; a reader sees the old one, or none, or the new one, never part of it.
    func put(_ key: String, _ bytes: [UInt8]) throws
    /// Writes the object only if there is none under the key (an atomic test: a lock).
    /// Returns false when one was there.
    func putIfAbsent(_ key: String, _ bytes: [UInt8]) throws -> Bool
    /// Every object whose key starts with `prefix`, with its size in bytes.
    func list(_ prefix: String) throws -> [(key: String, size: Int)]
    /// Removes the objects (those already gone are no error).
    func delete(_ keys: [String]) throws
    /// Makes every put so far durable: what a manifest names must survive a power cut before the manifest is written.
    func makeDurable() throws
    /// Removes what writers that died left half-written (S3 multipart uploads, a directory's temporary files)
    /// once it is at least `age` seconds old; returns how many it removed.
    func abortStaleUploads(olderThan age: TimeInterval) throws -> Int
    /// Writes a whole object that becomes visible, durable, by the next `makeDurable` at the latest
    /// (never visible before it is durable), so that a target can make many durable at once.
    /// (The bytes are the caller's buffer, reused once the call returns.)
    func putDeferred(_ key: String, _ bytes: UnsafeRawBufferPointer) throws
}

extension BackupTarget {
    public func putDeferred(_ key: String, _ bytes: UnsafeRawBufferPointer) throws { try put(key, Array(bytes)) }

    public func putDeferred(_ key: String, _ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try putDeferred(key, $0) } }
}

public struct BackupTargetError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A target from its URL: file:///path, or s3://bucket/prefix (with `s3Settings`, or those of the environment).
public func openBackupTarget(_ url: String, s3Settings: S3Settings? = nil) throws -> BackupTarget {
    if url.hasPrefix("file://") {
        let path = String(url.dropFirst("file://".count))
        guard path.hasPrefix("/") else { throw BackupTargetError("\(url) is not an absolute file URL: write file:///path/to/dir") }
        return try DirectoryTarget(url: url, path: path)
    }
    if url.hasPrefix("s3://") {
        let settings: S3Settings
        do { settings = try s3Settings ?? S3Settings.fromEnvironment() } catch { throw BackupTargetError("\(url): \(error)") }
        return try S3Target(url: url, settings: settings)
    }
    throw BackupTargetError("\(url) is not a backup target: use file:///path/to/dir or s3://bucket/prefix")
}
