package handlers

// ListAllAt is listAllAt, for the tests.
const ListAllAt = listAllAt
