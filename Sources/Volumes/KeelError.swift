/// A failure the user can act on, already phrased for them: the CLI prints
/// it as one line and exits non-zero.
public struct KeelError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
