//go:build 386 || amd64 || arm || arm64 || loong64 || riscv64 || s390x

package nbd

// blkGetDiskSeq is _IOR(0x12, 128, __u64) in the generic ioctl encoding
// of these architectures (read: 2 << 30, size << 16, type << 8, number):
// the build of the tests fails otherwise (GOARCH=386 go vet ./nbd checks
// a 32-bit one on this machine).
var (
	_ [blkGetDiskSeq - (2<<30 | 8<<16 | 0x12<<8 | 128)]struct{}
	_ [(2<<30 | 8<<16 | 0x12<<8 | 128) - blkGetDiskSeq]struct{}
)
