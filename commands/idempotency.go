package commands

import "strings"

// Headers of the command contract, the same on REST and on NATS.
const (
	// IdempotencyKeyHeader names a command: the same key with the same body
	// answers the same operation again; with another body, 409 CONFLICT.
	IdempotencyKeyHeader = "Idempotency-Key"
	// RetryAfterHeader on a 503 answer says how many seconds to wait
	// before retrying; nothing was recorded.
	RetryAfterHeader = "Retry-After"
	// NextCursorHeader carries the cursor of the next page of GET
	// /operations; absent on the last page.
	NextCursorHeader = "X-Next-Cursor"
)

// MaxIdempotencyKeyBytes bounds an Idempotency-Key.
const MaxIdempotencyKeyBytes = 255

// ValidateIdempotencyKey checks an Idempotency-Key: empty (none), or 1 to
// MaxIdempotencyKeyBytes printable ASCII characters without spaces.
func ValidateIdempotencyKey(key string) error {
	if len(key) > MaxIdempotencyKeyBytes {
		return Invalid(IdempotencyKeyHeader, "%s must be at most %d bytes", IdempotencyKeyHeader, MaxIdempotencyKeyBytes)
	}
	if strings.IndexFunc(key, func(r rune) bool { return r < 0x21 || r > 0x7e }) >= 0 {
		return Invalid(IdempotencyKeyHeader, "%s must be printable ASCII without spaces", IdempotencyKeyHeader).
			WithDetail("provided_value", Shown(key, 80))
	}
	return nil
}
