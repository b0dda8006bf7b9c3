package state

import (
	"context"

	"github.com/volumed/volumed/commands"
)

// FirstOperation returns the newest operation f selects (f's Limit and
// Cursor aside), ok false when there is none. It reads pages of one and
// follows their cursor past a page whose record was left out (deleted,
// corrupt or moved out of f since the index was read), so the operation
// behind it is found, not taken for none.
func FirstOperation(ctx context.Context, r OperationReader, f Filter) (op commands.Operation, ok bool, err error) {
	f.Limit, f.Cursor = 1, ""
	for {
		ops, next, err := r.ListOperations(ctx, f)
		switch {
		case err != nil:
			return commands.Operation{}, false, err
		case len(ops) > 0:
			return ops[0], true, nil
		case next == "":
			return commands.Operation{}, false, nil
		}
		f.Cursor = next
	}
}
