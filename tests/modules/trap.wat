;; boom() traps.
(module
  (func (export "boom") (result i32)
    unreachable))
