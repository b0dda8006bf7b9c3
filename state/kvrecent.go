package state

import (
	"encoding/json"

	"github.com/volumed/volumed/commands"
)

// RecentOperations is a store that keeps the records of recent operations
// in memory: what a job's first delivery reads instead of the record's
// key (handlers). The embedded store does; Redis does not.
type RecentOperations interface {
	// RecentOperation is operation id at the revision this process last
	// wrote or saw (its watcher) when memory still holds that record;
	// false otherwise. It may be behind the store (another process's
	// write not yet seen): whoever decides on it writes by
	// compare-and-swap on its revision, and reads the record again when
	// that fails.
	RecentOperation(id string) (commands.Operation, bool)
}

var _ RecentOperations = (*KV)(nil)

// RecentOperation is id's record as memory holds it (RecentOperations).
func (k *KV) RecentOperation(id string) (commands.Operation, bool) {
	k.mu.RLock()
	rev, _, live := k.ops.rev(id)
	var (
		raw  []byte
		held bool
	)
	if live {
		raw, held = k.recent.get(id, rev)
	}
	k.mu.RUnlock()
	var op commands.Operation
	if !held || json.Unmarshal(raw, &op) != nil {
		return commands.Operation{}, false
	}
	op.Revision = rev
	return op, true
}
