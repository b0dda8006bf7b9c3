package redisstore

// SetListGap makes every later listing of s call fn between its read of
// the index and that of the records.
func SetListGap(s *Store, fn func()) { s.afterListIndex = fn }
