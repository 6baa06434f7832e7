// Package admission decides whether the host can hold a new worker (RAM,
// VRAM) or download (disk) and refuses with an *api.Error 507 when it
// cannot. The Ledger serialises admissions and keeps claims for workers that
// are still loading, so two spawns never pass on the same free memory.
package admission
