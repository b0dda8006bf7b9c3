package state

import (
	"time"

	"github.com/volumed/volumed/commands"
)

// The rules every backend applies, exported for backends outside this
// package (state/memstore, state/redisstore).

// CheckOperation refuses an operation without an id, a type or a status.
func CheckOperation(op commands.Operation) error { return checkOp(&op) }

// CheckMove refuses an update of old to op that neither CanMove nor
// CanAnnotate allows, with ErrTransition.
func CheckMove(old, op commands.Operation) error { return checkMove(&old, &op) }

// CheckLease refuses a lease without a name or holder, or too short.
func CheckLease(name, holder string, ttl time.Duration) error { return checkLease(name, holder, ttl) }

// CheckMapping refuses a mapping record without a volume id or a VM id.
func CheckMapping(m commands.Mapping) error { return checkMapping(m) }

// CheckExport refuses an export record without a volume id or a VM id.
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
func FormatCursor(op commands.Operation) string { return CursorAt(opScore(op.CreatedAt), op.ID) }

// CursorAt is the cursor of the page after the index entry of score (a
// Score) and id, what ParseCursor reads back: a listing that left out
// the last records it found still continues after them.
func CursorAt(score int64, id string) string { return formatCursor(opRef{score, id}) }

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

// Decode reads the JSON of the record stored at key into v: ErrCorrupt
// naming key unless it is a record of its kind with id id ("" checks no
// id).
func Decode[T any](key, id string, data []byte, v *T) error { return decode(key, id, data, v) }

// NewStats is Stats with every type and status counted at zero.
func NewStats() Stats { return newStats() }

// Score is the order of an operation created (or completed) at t in the
// newest-first listings and their cursors: t in microseconds.
func Score(t time.Time) int64 { return opScore(t) }

// CompletedAt is when op completed, else its last update.
func CompletedAt(op commands.Operation) time.Time { return completedAt(&op) }

// ParseCursor reads a cursor of FormatCursor: the Score and id of the
// last operation of the page before (id "" for cursor ""); a cursor that is
// not one is a bad request.
func ParseCursor(cursor string) (score int64, id string, err error) {
	ref, err := parseCursor(cursor)
	if err != nil || ref == nil {
		return 0, "", err
	}
	return ref.score, ref.id, nil
}

// Indexes names every index an operation belongs to (as "type:attach",
// "vm:<id>", …), "all" included.
func Indexes(op commands.Operation) []string {
	return indexNames(string(op.Type), string(op.Status), op.VolumeID, op.VM(), op.RequestedBy, true)
}

// FilterIndexes names the indexes that f selects by, or "all" when it
// selects by nothing.
func FilterIndexes(f Filter) []string { return filterIndexes(f) }

// Gone is the error of a compare-and-swap write on a deleted record.
func Gone(what, key string) error { return gone(what, key) }

// Stale is the error of a compare-and-swap write that lost: ErrStale.
func Stale(what, key string, rev uint64) error { return stale(what, key, rev) }
