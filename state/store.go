// Package state keeps volumed's durable records, operations, device
// mappings and NBD exports, behind one Store interface with two backends: Redis and an
// embedded store on the embedded NATS server's JetStream KeyValue.
package state

import (
	"context"
	"errors"
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
)

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
	// Limit bounds the number of results.
	Limit int
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

// Store keeps operations, mappings and exports. Every method is safe for concurrent
// use; each write is atomic (all of it or none of it).
type Store interface {
	// CreateOperation records a new operation; ErrExists if the id is taken.
	CreateOperation(ctx context.Context, op commands.Operation) error
	// UpdateOperation replaces a recorded operation, moving its indexes;
	// ErrNotFound if it was never created.
	UpdateOperation(ctx context.Context, op commands.Operation) error
	// GetOperation returns one operation or ErrNotFound.
	GetOperation(ctx context.Context, id string) (commands.Operation, error)
	// ListOperations returns the operations matching f, newest first,
	// without reading records that do not match.
	ListOperations(ctx context.Context, f Filter) ([]commands.Operation, error)
	// Stats counts operations by type and status.
	Stats(ctx context.Context) (Stats, error)

	// PutMapping creates or replaces the mapping of m.VolumeID, keeping the
	// device-path and VM indexes; ErrConflict if another volume's mapping
	// holds m.DevicePath on the same VM.
	PutMapping(ctx context.Context, m commands.Mapping) error
	// GetMapping returns the mapping of a volume or ErrNotFound.
	GetMapping(ctx context.Context, volumeID string) (commands.Mapping, error)
	// GetMappingByDevice returns the mapping holding a device path on a VM.
	GetMappingByDevice(ctx context.Context, vmID, devicePath string) (commands.Mapping, error)
	// ListMappings returns the mappings of one VM, or all when vmID is "".
	ListMappings(ctx context.Context, vmID string) ([]commands.Mapping, error)
	// DeleteMapping removes a volume's mapping; no error if there is none.
	DeleteMapping(ctx context.Context, volumeID string) error

	// PutExport creates or replaces the export record of e.VolumeID.
	PutExport(ctx context.Context, e commands.Export) error
	// GetExport returns the export record of a volume or ErrNotFound.
	GetExport(ctx context.Context, volumeID string) (commands.Export, error)
	// ListExports returns every export record, sorted by volume id.
	ListExports(ctx context.Context) ([]commands.Export, error)
	// DeleteExport removes a volume's export record; no error if there is
	// none.
	DeleteExport(ctx context.Context, volumeID string) error

	// Ping checks the backend is reachable.
	Ping(ctx context.Context) error
	// Close releases the backend's resources. Closing twice is safe.
	Close(ctx context.Context) error
}
