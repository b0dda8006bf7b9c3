package state

// SetListGap makes every later listing of k call fn between its read of
// the index and that of the records, which it then reads from the bucket:
// k forgets the records it keeps in memory (recentOps), as it has those
// of an older page.
func SetListGap(k *KV, fn func()) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.recent = newRecentOps(kvRecentOps)
	k.afterListIndex = fn
}
