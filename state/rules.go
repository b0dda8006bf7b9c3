package state

import (
	"time"

	"github.com/volumed/volumed/commands"
)

// The rules every backend applies, exported for backends outside this
// package (state/memstore).

// CheckOperation refuses an operation without an id, a type or a status.
func CheckOperation(op commands.Operation) error { return checkOp(&op) }

// CheckMove refuses an update of old to op that neither CanMove nor
// CanAnnotate allows, with ErrTransition.
func CheckMove(old, op commands.Operation) error { return checkMove(&old, &op) }

// CheckLease refuses a lease without a name or holder, or too short.
func CheckLease(name, holder string, ttl time.Duration) error { return checkLease(name, holder, ttl) }

// CheckExport refuses an export record without a volume id.
func CheckExport(e commands.Export) error { return checkExport(e) }

// Matches reports whether op has every field f sets (f's Limit and Cursor
// aside).
func Matches(op commands.Operation, f Filter) bool { return matches(&op, f) }

// CompareNewestFirst orders operations as listings return them: newest
// CreatedAt first (to the microsecond), then by id, descending.
func CompareNewestFirst(a, b commands.Operation) int {
	return compareRefs(opRef{opScore(b.CreatedAt), b.ID}, opRef{opScore(a.CreatedAt), a.ID})
}

// FormatCursor is the cursor of the page after op.
func FormatCursor(op commands.Operation) string { return formatCursor(op) }

// AfterCursor returns whether an operation comes after cursor in the
// newest-first order (always true for ""); a cursor that is not one is a
// bad request.
func AfterCursor(cursor string) (func(commands.Operation) bool, error) {
	ref, err := parseCursor(cursor)
	if err != nil || ref == nil {
		return func(commands.Operation) bool { return true }, err
	}
	return func(op commands.Operation) bool {
		return compareRefs(opRef{opScore(op.CreatedAt), op.ID}, *ref) < 0
	}, nil
}

// SortMappings orders mappings as ListMappings returns them.
func SortMappings(ms []commands.Mapping) { sortMappings(ms) }

// SortExports orders exports as ListExports returns them.
func SortExports(es []commands.Export) { sortExports(es) }
