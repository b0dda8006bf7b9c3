// Package state keeps volumed's durable records, operations, device
// mappings and NBD exports, and its leases, behind one Store interface with
// two backends: Redis and an embedded store on the embedded NATS server's
// JetStream KeyValue. Every write is a compare-and-swap on the record's
// revision.
package state

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"time"

	"github.com/volumed/volumed/commands"
)

// Errors of every Store. Backends wrap them with %w.
var (
	// ErrNotFound: no record with that key.
	ErrNotFound = errors.New("not found")
	// ErrExists: CreateOperation with an id already recorded.
	ErrExists = errors.New("already exists")
	// ErrUnavailable: the backend could not be reached; nothing was written.
	ErrUnavailable = errors.New("state store unavailable")
	// ErrConflict: a mapping write would give one device of a VM to two
	// volumes.
	ErrConflict = errors.New("conflict")
	// ErrStale: a compare-and-swap write carried a revision that is no
	// longer the record's (another writer got in between, or the record was
	// deleted); nothing was written. The writer re-reads and decides again.
	ErrStale = errors.New("stale revision")
	// ErrTransition: an operation write would move its status in a way the
	// state machine forbids (see CanMove), or change a terminal operation
	// otherwise than CanAnnotate allows; nothing was written.
	ErrTransition = errors.New("status transition not allowed")
	// ErrLeaseHeld: another holder has the lease.
	ErrLeaseHeld = errors.New("lease held by another holder")
	// ErrLeaseLost: the lease expired or was taken since it was acquired or
	// last renewed.
	ErrLeaseLost = errors.New("lease lost")
	// ErrCorrupt: a stored record is not a record of its kind (not JSON,
	// a field every writer sets missing, or the record of another id);
	// the error names its key. Nothing reads it as an empty record; a
	// mapping or export write or delete on its revision replaces it (an
	// operation's is refused: a person repairs it).
	ErrCorrupt = errors.New("corrupt record")
)

// Corrupt is a stored record that is not a record of its kind.
type Corrupt struct {
	// Kind is "mapping", "export" or "operation".
	Kind string
	// ID is the id of its key: the volume's, or the operation's.
	ID string
	// Key is the record's key in its store.
	Key string
	// Revision is the record's revision: a mapping or export write or
	// delete on it replaces the record.
	Revision uint64
	// Err says what is wrong with it.
	Err string
}

// CorruptLister is a store that lists the records its index skipped as
// corrupt, for the reconcile to repair.
type CorruptLister interface {
	CorruptRecords(ctx context.Context) ([]Corrupt, error)
}

var _ CorruptLister = (*KV)(nil)

// CanMove reports whether an operation may move from status from to
// status to: pending → executing | failed | cancelled, executing →
// executing | completed | failed | cancelled. A terminal operation never
// changes again, but for the annotation CanAnnotate allows.
func CanMove(from, to commands.OpStatus) bool {
	switch from {
	case commands.StatusPending:
		return to == commands.StatusExecuting || to == commands.StatusFailed || to == commands.StatusCancelled
	case commands.StatusExecuting:
		return to == commands.StatusExecuting || to.Terminal()
	}
	return false
}

// CanAnnotate reports whether the failed operation old may be rewritten as
// op: the one change a terminal operation allows, a details-only
// annotation (the reconcile recording what became of a CloudStack job the
// operation timed out on). op must still be failed, with every field but
// Details and UpdatedAt equal to old's: type, status, volume, VM, request,
// response, error, step, job, attempts, creation and completion. Completed
// and cancelled operations never change. Both stores allow it, like a
// status move, only as a compare-and-swap on the revision read; it moves
// no index and no count, and the operation's retention still runs from
// its completion.
func CanAnnotate(old, op commands.Operation) bool {
	return old.Status == commands.StatusFailed && op.Status == commands.StatusFailed &&
		old.Type == op.Type && old.VolumeID == op.VolumeID && sameVM(old.VMID, op.VMID) &&
		sameRaw(old.Request, op.Request) && reflect.DeepEqual(old.Response, op.Response) &&
		old.Error == op.Error && old.Step == op.Step && old.JobID == op.JobID && old.Attempts == op.Attempts &&
		old.CreatedAt.Equal(op.CreatedAt) && sameTime(old.CompletedAt, op.CompletedAt)
}

// sameVM reports whether two optional VM ids are equal.
func sameVM(a, b *string) bool {
	return (a == nil) == (b == nil) && (a == nil || *a == *b)
}

// sameTime reports whether two optional times are the same instant.
func sameTime(a, b *time.Time) bool {
	return (a == nil) == (b == nil) && (a == nil || a.Equal(*b))
}

// sameRaw reports whether two JSON documents are equal but for
// insignificant space (a stored request is compacted).
func sameRaw(a, b json.RawMessage) bool {
	var ca, cb bytes.Buffer
	if json.Compact(&ca, a) != nil || json.Compact(&cb, b) != nil {
		return bytes.Equal(a, b)
	}
	return bytes.Equal(ca.Bytes(), cb.Bytes())
}

// Filter selects operations. Empty fields match everything; Limit 0 means
// no limit. Results are newest first (by CreatedAt, then id).
type Filter struct {
	// Type selects operations of this type.
	Type commands.OpType
	// Status selects operations in this status.
	Status commands.OpStatus
	// VolumeID selects operations on this volume.
	VolumeID string
	// VMID selects operations on this VM.
	VMID string
	// RequestedBy selects operations requested by this principal.
	RequestedBy string
	// Limit bounds the number of results.
	Limit int
	// Cursor, when set, is the next cursor of an earlier page: results are
	// strictly after it in the newest-first order. It is opaque.
	Cursor string
}

// Lease is a named lease held by one holder until Expires. Token fences
// the holder: it grows with every acquisition and renewal, and only the
// last one renews or releases.
type Lease struct {
	// Name of the lease ("reconcile", "vm:<vm_id>", …).
	Name string
	// Holder names the instance that holds it.
	Holder string
	// Token is the fencing token of this acquisition or renewal.
	Token uint64
	// Expires is when the lease ends unless renewed, by the caller's clock
	// (measured from before the write, so never later than the store's).
	Expires time.Time
	// TTL is the lease's time to live, which every renewal extends it by.
	TTL time.Duration
}

// Stats are counts over every recorded operation.
type Stats struct {
	// Total counts every recorded operation.
	Total int64
	// ByType counts the operations of each type.
	ByType map[commands.OpType]int64
	// ByStatus counts the operations in each status.
	ByStatus map[commands.OpStatus]int64
	// Terminal counts operations that completed or failed or were
	// cancelled; TerminalDuration is the sum of their durations.
	Terminal         int64
	TerminalDuration time.Duration
	// Writes counts the store writes (transactions) this process made.
	Writes int64
}

// OperationReader reads operations: the REST bridge's reads, the
// schedulers' listings.
type OperationReader interface {
	// GetOperation returns one operation or ErrNotFound.
	GetOperation(ctx context.Context, id string) (commands.Operation, error)
	// ListOperations returns the operations matching f, newest first,
	// without reading records that do not match, and the cursor of the
	// next page ("" when there is none). A page may be short, or empty,
	// and still have a next one: the records of the ids its index read
	// that were deleted, corrupt or moved out of f meanwhile are left out.
	ListOperations(ctx context.Context, f Filter) ([]commands.Operation, string, error)
	// Stats counts operations by type and status.
	Stats(ctx context.Context) (Stats, error)
}

// OperationWriter records operations by compare-and-swap.
type OperationWriter interface {
	// CreateOperation records a new operation and returns it with its
	// revision; ErrExists if the id is taken.
	CreateOperation(ctx context.Context, op commands.Operation) (commands.Operation, error)
	// UpdateOperation replaces the operation recorded at op.Revision,
	// moving its indexes, and returns it with its new revision. ErrStale if
	// the record changed since (ErrStale and ErrNotFound if it is gone);
	// ErrTransition if CanMove refuses the status move and CanAnnotate the
	// rewrite of a terminal record.
	UpdateOperation(ctx context.Context, op commands.Operation) (commands.Operation, error)
	// DeleteOperation removes the operation recorded at rev with its index
	// entries and counts; ErrStale if the record has another revision; no
	// error if there is none.
	DeleteOperation(ctx context.Context, id string, rev uint64) error
}

// Operations reads and writes operations: the engine's journal.
type Operations interface {
	OperationReader
	OperationWriter
}

// Pruner deletes old terminal operations (retention).
type Pruner interface {
	// PruneOperations deletes up to limit (0: no limit) terminal operations
	// completed before completedBefore, with their index entries and
	// counts, and returns how many it deleted. It holds a completed test
	// failover, and the failed and cancelled rollbacks of it, until a
	// rollback of it completes, and counts their end from that
	// rollback's (RetainedEnd); held operations do not count against
	// limit.
	PruneOperations(ctx context.Context, completedBefore time.Time, limit int) (int, error)
}

// LocalPruner is a store that keeps copies of records of its own in this
// process's files (the embedded store's archive, kvarchive.go): every
// instance prunes them, holding the retention's lease or not.
type LocalPruner interface {
	// PruneLocal removes this process's copies of the records of
	// operations completed before completedBefore.
	PruneLocal(completedBefore time.Time)
}

// MappingReader reads device mappings.
type MappingReader interface {
	// GetMapping returns the mapping of a volume or ErrNotFound.
	GetMapping(ctx context.Context, volumeID string) (commands.Mapping, error)
	// GetMappingByDevice returns the mapping holding a device path on a VM.
	GetMappingByDevice(ctx context.Context, vmID, devicePath string) (commands.Mapping, error)
	// ListMappings returns the mappings of one VM, or all when vmID is "".
	ListMappings(ctx context.Context, vmID string) ([]commands.Mapping, error)
}

// Mappings reads and writes device mappings: the one mapping writer's
// store.
type Mappings interface {
	MappingReader
	// PutMapping writes the mapping of m.VolumeID, keeping the device-path
	// and VM indexes, and returns it with its new revision. m.Revision 0
	// creates it (ErrStale if one exists); otherwise it replaces the
	// mapping recorded at m.Revision (ErrStale if it changed or is gone).
	// ErrConflict if another volume's mapping holds m.DevicePath on the
	// same VM.
	PutMapping(ctx context.Context, m commands.Mapping) (commands.Mapping, error)
	// DeleteMapping removes a volume's mapping: any revision when rev is 0,
	// else only the one recorded at rev (ErrStale otherwise). No error if
	// there is none.
	DeleteMapping(ctx context.Context, volumeID string, rev uint64) error
}

// ExportReader reads NBD export records.
type ExportReader interface {
	// GetExport returns the export record of a volume or ErrNotFound.
	GetExport(ctx context.Context, volumeID string) (commands.Export, error)
	// ListExports returns every export record, sorted by volume id.
	ListExports(ctx context.Context) ([]commands.Export, error)
}

// Exports reads and writes NBD export records.
type Exports interface {
	ExportReader
	// PutExport writes the export record of e.VolumeID as PutMapping does
	// (Revision 0 creates, otherwise compare-and-swap).
	PutExport(ctx context.Context, e commands.Export) (commands.Export, error)
	// DeleteExport removes a volume's export record as DeleteMapping does.
	DeleteExport(ctx context.Context, volumeID string, rev uint64) error
}

// Leases are named, fenced leases: the one lease implementation.
type Leases interface {
	// AcquireLease takes the lease name for holder for ttl (at least one
	// second); ErrLeaseHeld if another holder has it. The same holder
	// taking it again gets a new token.
	AcquireLease(ctx context.Context, name, holder string, ttl time.Duration) (Lease, error)
	// RenewLease extends l by l.TTL from now and returns it with a new
	// token; ErrLeaseLost if it expired or was taken since.
	RenewLease(ctx context.Context, l Lease) (Lease, error)
	// ReleaseLease ends l; ErrLeaseLost if it expired or was taken since.
	ReleaseLease(ctx context.Context, l Lease) error
}

// Reader is every read the REST bridge makes.
type Reader interface {
	OperationReader
	MappingReader
	ExportReader
}

// Store keeps operations, mappings, exports and leases: every role above.
// Every method is safe for concurrent use; each write is atomic (all of it
// or none of it). Records carry a Revision: every read sets it and every
// write returns the record with its new one. Writes are compare-and-swap on
// it, so a writer that lost a race gets ErrStale and must re-read and
// decide again. Consumers take the roles they use, not the whole Store.
type Store interface {
	Operations
	Pruner
	Mappings
	Exports
	Leases
	// Ping checks the backend is reachable.
	Ping(ctx context.Context) error
	// Close releases the backend's resources. Closing twice is safe.
	Close(ctx context.Context) error
}
