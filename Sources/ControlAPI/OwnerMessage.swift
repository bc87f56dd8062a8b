import ReplicaIdentity

extension Owner {
    public var message: Keel_Control_V1_Owner {
        .with { $0.epoch = epoch; $0.engine = engine }
    }

    public init(_ message: Keel_Control_V1_Owner) {
        self.init(epoch: message.epoch, engine: message.engine)
    }
}
