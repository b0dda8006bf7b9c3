package state

import (
	"context"

	"github.com/volumed/volumed/commands"
)

// GatedMapping reads a volume's mapping once await lets the mappings of
// its VM be read (await reports whether it had to wait, and then the
// mapping is read again: it may have changed meanwhile). await's error is
// returned as it is.
func GatedMapping(ctx context.Context, r MappingReader, await func(ctx context.Context, vmID string) (bool, error),
	volumeID string) (commands.Mapping, error) {
	m, err := r.GetMapping(ctx, volumeID)
	if err != nil {
		return m, err
	}
	waited, err := await(ctx, m.VMID)
	switch {
	case err != nil:
		return m, err
	case waited:
		return r.GetMapping(ctx, volumeID)
	}
	return m, nil
}
