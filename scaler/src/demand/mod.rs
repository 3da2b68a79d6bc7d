//! The demand endpoint: the server side of the demand protocol. (Module docs go here.)
