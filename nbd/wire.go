package nbd

// Wire constants of the NBD protocol (fixed newstyle), from
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.
const (
	magicNBD        uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt        uint64 = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply   uint64 = 0x0003e889045565a9
	magicRequest    uint32 = 0x25609513
	magicSimpleRep  uint32 = 0x67446698
	magicStructured uint32 = 0x668e33ef

	// Handshake flags (server) and client flags.
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1
	clientFixed       uint32 = 1 << 0
	clientNoZeroes    uint32 = 1 << 1

	// Options.
	optExportName     uint32 = 1
	optAbort          uint32 = 2
	optList           uint32 = 3
	optStartTLS       uint32 = 5
	optInfo           uint32 = 6
	optGo             uint32 = 7
	optStructuredRepl uint32 = 8
	optListMetaCtx    uint32 = 9
	optSetMetaCtx     uint32 = 10

	// Option reply types.
	repAck         uint32 = 1
	repServer      uint32 = 2
	repInfo        uint32 = 3
	repMetaContext uint32 = 4
	repErrUnsup    uint32 = 1 | 1<<31
	repErrPolicy   uint32 = 2 | 1<<31
	repErrInvalid  uint32 = 3 | 1<<31
	repErrTLSReqd  uint32 = 5 | 1<<31
	repErrUnknown  uint32 = 6 | 1<<31
	repErrTooBig   uint32 = 9 | 1<<31

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
	tfWriteZeroes  uint16 = 1 << 6
	tfCanMultiConn uint16 = 1 << 8
	tfSendCache    uint16 = 1 << 10
	tfFastZero     uint16 = 1 << 11

	// Commands.
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7

	// Command flags.
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4

	// Structured reply flags and chunk types.
	replyFlagDone    uint16 = 1 << 0
	replyNone        uint16 = 0
	replyOffsetData  uint16 = 1
	replyBlockStatus uint16 = 5
	replyError       uint16 = 1<<15 | 1
	replyErrorOffset uint16 = 1<<15 | 2
	stateHole        uint32 = 1 << 0
	stateZero        uint32 = 1 << 1
	metaBaseAlloc           = "base:allocation"
	metaBaseAllocID  uint32 = 1

	// Error values in replies.
	errPerm     uint32 = 1
	errIO       uint32 = 5
	errInval    uint32 = 22
	errNoSpace  uint32 = 28
	errOverflow uint32 = 75
	errNotSup   uint32 = 95
	errShutdown uint32 = 108
)

// Limits this server enforces.
const (
	// maxOptionLen bounds an option's data; names are at most 4096 bytes.
	maxOptionLen = 64 << 10
	// maxPayload is the largest read or write request, advertised as the
	// maximum block size (the protocol's de-facto default, 32 MiB).
	maxPayload = 32 << 20
	// preferredBlock is the advertised preferred block size.
	preferredBlock = 4096
	// maxExtents bounds the descriptors in one block-status reply.
	maxExtents = 1024
	// maxMetaQueries bounds the queries in one meta-context option.
	maxMetaQueries = 16
	// maxErrMsg is the longest message an error chunk carries (the
	// protocol's bound).
	maxErrMsg = 4096
)
