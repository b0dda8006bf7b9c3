// Package httpbridge serves volumed's REST API under /api/v1. Commands run
// in process through Commands, the command service that also answers them
// on NATS; reads come from the state store and the Backend; waits follow
// the store's view of the operation's end (the embedded store's), or the
// operation events on NATS.
package httpbridge

import (
	"context"

	"github.com/volumed/volumed/commands"
)

// Commands runs the API's commands: volumed's command service, the same
// code that answers them on NATS (volumes.cmd.*), called in process.
type Commands interface {
	// Command runs the command of subject with body data and the
	// request's Idempotency-Key (key, "" for none) and returns its answer.
	Command(ctx context.Context, subject string, data []byte, key string) commands.Answer
}

// Backend answers the reads that need more than the state store.
type Backend interface {
	// VolumeStatus joins CloudStack's view, the mapping and the last
	// operation of a volume; a *commands.Error NOT_FOUND if CloudStack and
	// the store know nothing of it.
	VolumeStatus(ctx context.Context, volumeID string) (commands.VolumeStatus, error)
	// VMVolumes lists the volumes attached to a VM.
	VMVolumes(ctx context.Context, vmID string) ([]commands.VolumeStatus, error)
	// Volumes lists the volumes f selects, ordered by id, a page at a
	// time; next is the cursor of the next page, "" after the last.
	Volumes(ctx context.Context, f commands.VolumeFilter) (rows []commands.VolumeStatus, next string, err error)
	// VolumeSnapshots lists a volume's snapshots, newest first; a
	// *commands.Error NOT_FOUND for an unknown volume.
	VolumeSnapshots(ctx context.Context, volumeID string) ([]commands.Snapshot, error)
	// Snapshot is one snapshot; a *commands.Error NOT_FOUND for an
	// unknown or deleted one.
	Snapshot(ctx context.Context, snapshotID string) (commands.Snapshot, error)
	// Health probes every dependency.
	Health(ctx context.Context) commands.Health
	// Metrics counts operations and calls.
	Metrics(ctx context.Context) (commands.Metrics, error)
	// Exports lists this host's NBD exports with their connected clients;
	// a *commands.Error SERVICE_UNAVAILABLE when the NBD server is off.
	Exports(ctx context.Context) ([]commands.Export, error)
	// Export is one volume's export with its connected clients; a
	// *commands.Error NOT_FOUND when the volume is not exported.
	Export(ctx context.Context, volumeID string) (commands.Export, error)
	// AwaitStartCheck waits until the mappings vmID had when volumed
	// started were checked against its devices, reporting whether it
	// waited; a *commands.Error SERVICE_UNAVAILABLE when ctx ends first.
	AwaitStartCheck(ctx context.Context, vmID string) (bool, error)
}
