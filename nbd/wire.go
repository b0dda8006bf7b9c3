package nbd

// Wire constants of the NBD protocol (fixed newstyle), from
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.
const (
	magicNBD       uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt       uint64 = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply  uint64 = 0x0003e889045565a9
	magicRequest   uint32 = 0x25609513
	magicSimpleRep uint32 = 0x67446698

	// Handshake flags (server) and client flags.
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1
	clientFixed       uint32 = 1 << 0
	clientNoZeroes    uint32 = 1 << 1

	// Options.
	optExportName uint32 = 1
	optAbort      uint32 = 2
	optList       uint32 = 3
	optInfo       uint32 = 6
	optGo         uint32 = 7

	// Option reply types.
	repAck        uint32 = 1
	repServer     uint32 = 2
	repInfo       uint32 = 3
	repErrUnsup   uint32 = 1 | 1<<31
	repErrInvalid uint32 = 3 | 1<<31
	repErrUnknown uint32 = 6 | 1<<31

	// NBD_INFO types.
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3

	// Transmission flags.
	tfHasFlags     uint16 = 1 << 0
	tfReadOnly     uint16 = 1 << 1
	tfSendFlush    uint16 = 1 << 2
	tfSendFUA      uint16 = 1 << 3
	tfSendTrim     uint16 = 1 << 5
	tfCanMultiConn uint16 = 1 << 8

	// Commands and command flags.
	cmdRead    uint16 = 0
	cmdWrite   uint16 = 1
	cmdDisc    uint16 = 2
	cmdFlush   uint16 = 3
	cmdTrim    uint16 = 4
	cmdFlagFUA uint16 = 1 << 0

	// Error values in replies.
	errPerm    uint32 = 1
	errIO      uint32 = 5
	errInval   uint32 = 22
	errNoSpace uint32 = 28
)

// Limits this server enforces.
const (
	// maxOptionLen bounds an option's data; names are at most 4096 bytes.
	maxOptionLen = 64 << 10
	// maxPayload is the largest read or write request (the protocol's
	// de-facto default maximum, 32 MiB).
	maxPayload = 32 << 20
	// preferredBlock is the advertised preferred block size.
	preferredBlock = 4096
)
