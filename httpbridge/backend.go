// Package httpbridge serves volumed's REST API under /api/v1. Commands go
// over NATS request/reply to the volumes.cmd.* subjects; reads come from the
// state store and the Backend.
package httpbridge

import (
	"context"

	"github.com/volumed/volumed/commands"
)

// Backend answers the reads that need more than the state store.
type Backend interface {
	// VolumeStatus joins CloudStack's view, the mapping and the last
	// operation of a volume; a *commands.Error NOT_FOUND if CloudStack and
	// the store know nothing of it.
	VolumeStatus(ctx context.Context, volumeID string) (commands.VolumeStatus, error)
	// VMVolumes lists the volumes attached to a VM.
	VMVolumes(ctx context.Context, vmID string) ([]commands.VolumeStatus, error)
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
}
